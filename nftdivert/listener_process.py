"""The built-in listeners in a process of their own.

In the worker's process they shared its interpreter lock with the queue
worker's hot path: `make bench` measured a third fewer diverted connections
per second that way. The child reports back over one pipe: ready or the
error that stopped it, each DNS question it answered (the conversation log
names conversations by them), and its counters once a second. It dies with
its parent (PR_SET_PDEATHSIG), so a `kill -9` of the worker does not leave
the listener ports taken for the next run.
"""

from __future__ import annotations

import ctypes
import ipaddress
import multiprocessing
import signal
import threading
from typing import Callable

from .config import Config
from .dns import AnswerPool, Resolver
from .listeners import Listeners, ListenerStats

_PR_SET_PDEATHSIG = 1
_STATS_SECONDS = 1.0

Question = Callable[[str, str, str, str], None]  # client, name, type, answer


class ListenerProcess:
    """start() returns once every port is bound, or raises OSError naming the listener."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._names: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
        self._stats: dict[str, ListenerStats] = {
            lst.name: ListenerStats() for lst in config.listeners if lst.kind != "external"}
        self.on_question: Question | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._conn = None

    @property
    def stats(self) -> dict[str, ListenerStats]:
        return self._stats

    def name_for(self, address) -> str | None:
        """The DNS name the built-in resolver last gave out this address for."""
        return self._names.get(address)

    def start(self, timeout: float = 15.0) -> None:
        if not self._stats:
            return  # only external listeners: nothing to run
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_serve, args=(self._config, child_end),
                                    name="nftdivert-listeners", daemon=True)
        self._process.start()
        child_end.close()
        self._conn = parent_end
        if not parent_end.poll(timeout):
            self.stop()
            raise OSError("the listener process did not come up")
        try:
            first = parent_end.recv()
        except EOFError:
            first = ("error", "the listener process exited while starting")
        if first[0] != "ready":
            self.stop()
            raise OSError(first[1])
        self._reader = threading.Thread(target=self._read, name="nftdivert-listener-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "dns":
                _, client, name, qtype, answer = message
                if answer:
                    self._names[ipaddress.ip_address(answer)] = name
                if self.on_question is not None:
                    self.on_question(client, name, qtype, answer)
            elif message[0] == "stats":
                for name, (conversations, received) in message[1].items():
                    self._stats[name] = ListenerStats(conversations, received)

    def stop(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._reader = self._conn = None


def _serve(config: Config, conn) -> None:
    """The child: bind, say ready (or why not), serve, report, until SIGTERM."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                stop.set()  # the parent is gone

    resolver = None
    if any(lst.kind == "dns" for lst in config.listeners):
        v4, v6 = config.dns.pools()
        resolver = Resolver(AnswerPool(v4), AnswerPool(v6), config.dns.ttl,
                            on_question=lambda *q: send(("dns", *q)))
    listeners = Listeners(config.listeners, ipv6=config.ipv6, resolver=resolver)
    try:
        listeners.start()
    except OSError as exc:
        send(("error", str(exc)))
        return
    send(("ready",))
    try:
        while not stop.wait(_STATS_SECONDS):
            send(("stats", {n: (s.conversations, s.bytes_received) for n, s in listeners.stats.items()}))
    finally:
        listeners.stop()
        send(("stats", {n: (s.conversations, s.bytes_received) for n, s in listeners.stats.items()}))
        conn.close()
