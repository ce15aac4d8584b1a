"""Analyses in a running `nftdivert run`: the task table, what changes it, and each task's evidence.

Two ways in, both at once and without a restart:
- the control socket (STATE_DIR/<table>-<netns>.tasks, root's only), which
  `nftdivert task start|end` talks to: one JSON request a line, one JSON
  answer a line, and the command's error (an unknown or duplicate task) is
  the answer's;
- the analyses file ([analyses] file), read again whenever it changes.
A thread of its own serves both and ends tasks the file gave an end time;
packets never wait for it. The table it makes (tasks.TaskTable) is
immutable: the log tags records with whatever table is current, without a
lock (a conversation by the task its client belonged to at its start).
A task may choose a profile for its clients: `on_change` tells the run of
every table, before the start or end is answered or logged, so the
listeners give its clients that profile's answers from then on.
Each task's evidence (evidence.py) gets its records from the log's writer
thread and its packets from the capture's reader (pcapsplit.py); a task's
end waits until both have written what came before it, then summarizes.
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from nftdivert import tasks
from nftdivert.config import read_input
from nftdivert.errors import ConfigError, NftDivertError, say
from nftdivert.netlink import ctnetlink
from nftdivert.observers import evidence
from nftdivert.observers.convrecords import SCHEMA, iso
from nftdivert.ruleset import owner

POLL = 0.25  # seconds: how soon a changed analyses file, or an end it set, takes effect
RETAIN = 600.0  # seconds an ended task's intervals are kept for late records (its id stays taken)
REQUEST_MAX = 1 << 20
CONNECTION_SECONDS = 2.0  # a command that says nothing for this long is hung up on
FINISH_SECONDS = 10.0  # how long an end waits for the log's writer to reach it


def control_path(table: str) -> Path:
    return owner.STATE_DIR / f"{table}-{owner.netns_id()}.tasks"


def ask(table: str, request: dict) -> str:
    """Send `request` to the run that owns `table` here; its answer, or ConfigError (exit 2)."""
    path = control_path(table)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(FINISH_SECONDS * 3)  # an end may summarize a big task
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConfigError("--table", table, "no nftdivert run owns this table in this network namespace "
                                                "(or its conversation log is off, and with it the analyses)") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer = json.loads(_line(sock) or b"{}")
    except (OSError, ValueError) as exc:
        raise NftDivertError(f"the run of table {table} did not answer: {exc}") from None
    finally:
        sock.close()
    if "error" in answer:
        raise ConfigError(answer.get("key", "TASK"), answer.get("value"), answer["error"])
    if "ok" not in answer:
        raise NftDivertError(f"the run of table {table}: {answer.get('failed', 'no answer')}")
    return str(answer["ok"])


def _line(sock: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data and len(data) <= REQUEST_MAX:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0]


class Analyses:
    """The run's analyses: owner() and route() for the log, open() and close() for the run."""

    def __init__(self, config, log, capture=None) -> None:
        self._file, self._dir = config.analyses.file, config.analyses.directory
        self._table_name, self._ct_mark = config.table, config.worker.ct_mark
        self._log = log
        self._capture = capture if self._dir else None  # the split needs somewhere to put each pcap
        self.table = tasks.TaskTable()
        self._evidence: dict[str, evidence.Evidence] = {}  # task -> its evidence, while its records come
        self._live: set[str] = set()  # started, not yet finished here
        self._seen: tuple | None = None  # the analyses file as last read: (inode, size, mtime)
        self._checked = time.time()
        self._pruned = 0.0
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._stopping = False
        self.profile_names = frozenset(p.name for p in config.profiles)  # what a task may choose (a reload sets it)
        # Each new table, and each end the file set that came: the run's listeners and sets follow.
        self.on_change: Callable[[tasks.TaskTable], None] | None = None

    # -- the log's side (other threads)
    def owner(self, address: str, when: float) -> str | None:
        return self.table.owner(address, when)

    def route(self, rec: dict) -> None:
        ev = self._evidence.get(rec["task"])
        if ev is not None:
            ev.write(rec)

    # -- the run's side
    def open(self) -> None:
        """Read the file (bad content is bad input: ConfigError), bind the socket, start serving."""
        if self._file:
            self._read_file(at_start=True)
        path = control_path(self._table_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a killed run's: this run owns the table now
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            server.bind(str(path))
        finally:
            os.umask(old)
        server.listen(16)
        self._server = server
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="nftdivert-analyses", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; end every task still running, with its evidence summarized."""
        self._stopping = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=FINISH_SECONDS * 3)
        if self._server is not None:
            self._server.close()
            control_path(self._table_name).unlink(missing_ok=True)
        now = time.time()
        for task in self.table.tasks(now):
            self._set(self.table.ended(task, now))
        for task in list(self._live):
            self._finish(task, now)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)

    # -- the thread
    def _serve(self) -> None:
        while not self._stopping:
            readable, _, _ = select.select([self._server, self._wake_r], [], [], POLL)
            try:
                if self._server in readable:
                    self._answer()
                if self._file:
                    self._read_file()
                now = time.time()
                due = self.table.due_ends(self._checked, now)
                if due and self.on_change is not None:  # their profiles are not chosen any more
                    self.on_change(self.table)
                for task in due:
                    self._finish(task, self.table.end_of(task))
                self._checked = now
                if now - self._pruned > RETAIN:
                    self._set(self.table.pruned(now - RETAIN))
                    self._pruned = now
            except Exception as exc:  # noqa: BLE001 - the analyses must outlive one odd request
                say(f"analyses: {exc!r}")

    def _answer(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            conn.settimeout(CONNECTION_SECONDS)
            try:
                request = json.loads(_line(conn))
                answer = {"ok": self._request(request)}
            except ConfigError as exc:
                answer = {"error": exc.reason, "key": exc.key, "value": exc.value}
            except (OSError, ValueError) as exc:
                answer = {"error": f"unreadable request: {exc}", "key": "request", "value": None}
            except Exception as exc:  # noqa: BLE001 - said to the command, not taken for success
                answer = {"failed": f"the run could not do it: {exc!r}"}
            try:
                conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
            except OSError:
                pass  # it hung up: what it asked is done all the same

    def _request(self, request: object) -> str:
        if not isinstance(request, dict) or request.get("op") not in ("start", "end"):
            raise ConfigError("request", request, 'op must be "start" or "end"')
        task = tasks.check_task(request.get("task"))
        if request["op"] == "start":
            clients = tasks.check_clients(request.get("clients"))
            profile = request.get("profile")
            if profile is not None:
                tasks.check_profile(profile, self.profile_names)
            self._start(task, clients, time.time(), profile)
            where = f"; evidence in {evidence.directory(self._dir, task)}" if self._dir else ""
            chose = f"; profile {profile}" if profile is not None else ""
            return f"task {task} started: {', '.join(map(str, clients))}{chose}{where}"
        now = time.time()
        self._set(self.table.ended(task, now))
        made = self._finish(task, now)
        where = f"; evidence in {evidence.directory(self._dir, task)}: {', '.join(made)}" if made else ""
        return f"task {task} ended{where}"

    # -- starting and ending
    def _start(self, task: str, clients: tuple, now: float, profile: str | None = None) -> None:
        table = self.table.started(task, clients, now, profile=profile)  # a duplicate is refused before anything is made
        self._open_evidence(task)
        self._set(table)
        self._started(task, now)

    def _open_evidence(self, task: str) -> None:
        if not self._dir:
            return
        path = evidence.create(self._dir, task)
        try:
            self._evidence[task] = evidence.Evidence(task, path)
        except OSError as exc:
            raise ConfigError("analyses.directory", self._dir, exc.strerror or str(exc)) from None
        if self._capture is not None:
            self._capture.tell("open", task, str(path / evidence.PCAP))

    def _set(self, table: tasks.TaskTable) -> None:
        self.table = table
        if self._capture is not None:
            self._capture.tell("table", table)
        if self.on_change is not None:
            self.on_change(table)

    def _started(self, task: str, now: float) -> None:
        self._live.add(task)
        end, profile = self.table.end_of(task), self.table.profiles(now).get(task)
        self._log.put({"v": SCHEMA, "time": iso(now), "event": "task", "task": task, "action": "start",
                       "clients": [str(net) for net in self.table.clients(task)],
                       **({"end": iso(end)} if end is not None else {}),
                       **({"profile": profile} if profile is not None else {})})

    def _finish(self, task: str, when: float) -> list[str]:
        """The task's end record, then its evidence closed once the log and the capture reached it."""
        if task not in self._live:
            return []
        self._live.discard(task)
        self._log.put({"v": SCHEMA, "time": iso(when), "event": "task", "task": task, "action": "end"})
        ev = self._evidence.get(task)
        if ev is None:
            return []
        reached = threading.Event()
        if self._log.in_order(reached.set):
            reached.wait(FINISH_SECONDS)
        self._evidence.pop(task, None)
        if ev.open:
            ev.end_open(self._live_entries(), time.time())
        made = ev.finish()
        if self._capture is not None and self._capture.close_task(task) is not None:
            made.insert(1, evidence.PCAP)
        return made

    def _live_entries(self) -> list | None:
        try:
            return ctnetlink.dump_marked(self._ct_mark).live
        except OSError as exc:
            say(f"cannot ask conntrack for the conversations still open: {exc.strerror or exc}")
            return None

    # -- the analyses file
    def _read_file(self, at_start: bool = False) -> None:
        try:
            st = os.stat(self._file)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None  # no file (yet): no tasks from it
        except OSError as exc:
            raise ConfigError("analyses.file", self._file, exc.strerror or str(exc)) from None
        if seen == self._seen and not at_start:
            return
        self._seen = seen
        try:
            text = "" if seen is None else _read(self._file)
            specs = tasks.parse_file(text, self._file.endswith(".json"), profiles=self.profile_names) \
                if text.strip() else ()
        except ConfigError as exc:
            if at_start:
                raise
            say(f"analyses file not taken, nothing changed: {exc}")
            self._log.put({"v": SCHEMA, "time": iso(time.time()), "event": "task", "action": "refused",
                           "error": str(exc)})
            return
        now = time.time()
        table, started, ended = tasks.reconciled(self.table, specs, now)
        for task in list(started):
            try:
                self._open_evidence(task)
            except ConfigError as exc:  # the task runs, tagged, without a directory of its own
                say(f"task {task}: {exc}")
        self._set(table)
        for task in started:
            self._started(task, now)
        for task in ended:
            self._finish(task, now)


def _read(path: str) -> str:
    return read_input(path, "analyses.file")
