"""[hooks] first_conversation: a command run once per client address, or per
process where the log names the process (local mode, the sandbox), on its
first conversation.

The start record is passed on at once and the command runs on a thread of
its own, so a hook never delays a conversation or its record. Each run is a
`hook` record: the argv, the exit status and the output (cut). The argv's
placeholders are filled per argument and no shell sees them, so a name
the client chose cannot become a command. Hooks still running at stop are
killed (by the pid they were started with): nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from nftdivert.config import HooksConfig
from nftdivert.observers.convrecords import split_endpoint

OUTPUT_CHARS = 4096  # of a hook's output, logged
MAX_KEYS = 65536  # clients or processes remembered as hooked; the least recent forgotten
WORKERS = 4  # hooks running at once; the rest wait their turn


class Hooks:
    def __init__(self, config: HooksConfig, emit: Callable[[dict], None],
                 for_client: Callable[[str], HooksConfig] | None = None) -> None:
        self._emit = emit
        # A client's [hooks] by its address (its profile's); None: `config`'s for every client.
        self._for_client = for_client or (lambda _address: config)
        self._seen: dict[str, None] = {}
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="nftdivert-hook")
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._closed = False

    def watching(self, emit: Callable[[dict], None]) -> Callable[[dict], None]:
        """`emit`, which also runs the hook on each client's (or process's) first start record."""
        def put(rec: dict) -> None:
            emit(rec)
            if rec.get("event") == "start":
                self.seen(rec)
        return put

    def seen(self, rec: dict) -> None:
        process = rec.get("process") or {}
        address = split_endpoint(rec["client"])[0] if "client" in rec else ""
        key = f"pid {process['host_pid']}" if "host_pid" in process else f"client {address}"
        hooks = self._for_client(address)
        if key in self._seen or self._closed or not hooks.first_conversation:
            return
        self._seen[key] = None
        if len(self._seen) > MAX_KEYS:
            del self._seen[next(iter(self._seen))]
        values = {"client_address": address, "original_destination": rec.get("original_destination", ""),
                  "name": rec.get("name", ""), "protocol": rec.get("protocol", ""),
                  "pid": str(process.get("pid", "")), "host_pid": str(process.get("host_pid", "")),
                  "command": process.get("command", ""),
                  "time": rec.get("time", "")}
        argv = [arg.format_map(values) for arg in hooks.first_conversation]
        self._pool.submit(self._run, argv, key, values, hooks.timeout)

    def _run(self, argv: list[str], key: str, values: dict, timeout: float) -> None:
        rec = {"event": "hook", "hooked": key, "client_address": values["client_address"], "argv": argv}
        started = time.monotonic()
        with self._lock:  # started and known as running at once: close() kills it, or it never starts
            if self._closed:
                self._emit(dict(rec, error="not run: stopping"))
                return
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                self._emit(dict(rec, error=exc.strerror or str(exc)))
                return
            self._running.add(proc)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            output, _ = proc.communicate()
            rec["error"] = f"killed after {timeout:g} s"
        finally:
            with self._lock:
                self._running.discard(proc)
        self._emit(dict(rec, exit_status=proc.returncode, seconds=round(time.monotonic() - started, 3),
                        output=output.decode("utf-8", "replace")[:OUTPUT_CHARS]))

    def close(self) -> None:
        """At stop: no new hooks; the running ones killed, their records written."""
        with self._lock:
            self._closed = True
            for proc in self._running:
                _kill(proc)
        self._pool.shutdown(wait=True)  # those still waiting their turn log that they did not run


def _kill(proc: subprocess.Popen) -> None:
    """The hook and what it started: the session it leads is its own (start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
