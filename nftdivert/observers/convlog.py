"""The conversation log: a thread that writes records, JSON Lines or readable lines.

The records come from the conntrack observer (observer.py: one start and one
end record per conversation) and from the DNS listener (its questions and
recycled addresses). Writing never holds anything up: records wait in a
bounded queue, and beyond it they are dropped and counted.
"""

from __future__ import annotations

import json
import os
import queue
import stat
import threading
import time
from collections import OrderedDict
from typing import Callable, TextIO

from nftdivert.observers.convrecords import SCHEMA, iso, split_endpoint, with_task
from nftdivert.observers.logorder import LIVE_LIMIT, StartsFirst


def question_record(client: str, name: str, qtype: str, answer: str, rcode: str = "NOERROR",
                    profile: str | None = None) -> dict:
    """`profile`: the [[profiles]] name whose answers the DNS listener gave; None: the top-level ones."""
    return {"v": SCHEMA, "time": iso(time.time()), "event": "dns", "client": client,
            "client_address": split_endpoint(client)[0], **({"profile": profile} if profile else {}),
            "name": name, "type": qtype, "answer": answer, "rcode": rcode}


def recycled_record(when: float, address: str, old_name: str, new_name: str) -> dict:
    """The DNS pool was full: `address` stopped standing for old_name and now stands for new_name."""
    return {"v": SCHEMA, "time": iso(when), "event": "dns_recycled", "address": address, "old_name": old_name,
            "new_name": new_name}


def _conversation(rec: dict) -> str:
    named = f" ({rec['name']})" if rec.get("name") else ""
    icmp = f" type {rec['icmp']['type']}/{rec['icmp']['code']}" if "icmp" in rec else ""
    return f"{rec['protocol']:<6} {rec['client']:>22} -> {rec['original_destination']:<22}{named}{icmp}"


def _flow(rec: dict) -> str:
    def part(c):
        return f"{c['packets']} pkt {c['bytes']} B" if c else "?"
    duration = "?" if rec["duration"] is None else f"{rec['duration']:.3f} s"
    return f"{part(rec['sent'])} out, {part(rec['received'])} in, {duration}"


def text_line(rec: dict) -> str:
    at = rec["time"][11:23]
    event = rec.get("event")
    if event == "dns":
        answer = rec["answer"] or (rec["rcode"] if rec.get("rcode", "NOERROR") != "NOERROR" else "")
        return (f"{at}  dns    {rec['client']:>22} asked {rec['type']} {rec['name']}"
                f"{' -> ' + answer if answer else ''}")
    if event == "dns_recycled":
        return (f"{at}  dns    pool full: {rec['address']} now stands for {rec['new_name']}"
                f" (was {rec['old_name']})")
    if event in ("tls", "http"):
        return _service_line(rec)
    if event in _SERVER_FIRST:
        head = f"{at}  {event:<6} {rec.get('client', ''):>22}"
        return f"{head} {_SERVER_FIRST[event](rec)}"
    if event == "end":
        return f"{at}  end    {_conversation(rec)}  {rec['ended']}: {_flow(rec)}"
    if event == "admission":
        shown = " ".join(rec["original_destinations"])
        more = rec["destinations"] - len(rec["original_destinations"])
        return (f"{at}  admission dropped {rec['dropped']} new {rec['protocol']} from {rec['client_address']}"
                f" to {rec['destinations']} destinations: {shown}{f' (+{more} more)' if more else ''}")
    if event == "hook":  # [hooks]: a command on a client's (or process's) first conversation
        result = rec.get("error") or f"exit {rec['exit_status']}"
        return f"{at}  hook   {rec['hooked']}: {' '.join(rec['argv'])[:80]} -> {result}"
    if event == "task":
        what = {"start": lambda: " ".join(rec.get("clients", [])), "refused": lambda: rec.get("error", "")}
        return f"{at}  task   {rec.get('task', 'analyses file')} {rec['action']} {what.get(rec['action'], str)()}".rstrip()
    if event == "reload":
        return f"{at}  reload " + (f"refused: {rec['error']}" if "error" in rec else ", ".join(rec["sections"]))
    port = f" (:{rec['listener_port']})" if "listener_port" in rec else ""
    where = f" via {rec['interface']}" if rec.get("interface") else ""
    proc = rec.get("process")
    who = f" by pid {proc['pid']} {proc['command'][:40]}" if proc else ""
    task = f" task {rec['task']}" if "task" in rec else ""
    profile = f" profile {rec['profile']}" if "profile" in rec else ""
    return f"{at}  start  {_conversation(rec)} => {rec['listener'] or '-'}{port}{where}{who}{task}{profile}"


def _service_line(rec: dict) -> str:
    head = f"{rec['time'][11:23]}  {rec['event']:<6} {rec.get('client', ''):>22}"
    if rec.get("error") and rec["event"] == "http":
        return f"{head} bad request: {rec['error']}"
    if rec["event"] == "tls":
        offered = ",".join(rec.get("alpn_offered", []))
        result = "ok" if rec.get("result") == "ok" else f"failed: {rec.get('error', '')}"
        return (f"{head} sni={rec.get('sni', '-')} alpn={offered or '-'} "
                f"version={rec.get('version') or rec.get('client_version', '-')} {result}")
    if "body_size" not in rec:  # CONNECT: the tunnel's own records follow
        return f"{head} {rec['method']} {rec['url']} -> {rec['status']}, tunnel"
    saved = f" saved {rec['body_saved']}" if rec.get("body_saved") else ""
    h2 = " HTTP/2" if rec.get("http_version") == "2" else ""
    return (f"{head} {rec['method']} {rec['url']}{h2} -> {rec['status']}, body {rec['body_size']} bytes"
            f" sha256 {rec['body_sha256'][:16]}...{saved}")


def _kept(rec: dict) -> str:
    return f"{rec['size']} bytes sha256 {rec['sha256'][:16]}...{' saved ' + rec['saved'] if rec.get('saved') else ''}"


def _login(rec: dict) -> str:
    return f"login {rec.get('user', '')!r} password {rec.get('password', rec.get('apop_digest', ''))!r}"


# The text line after the client, per server-first event.
_SERVER_FIRST = {
    "smtp": lambda r: f"mail from {r['mail_from']} to {','.join(r['rcpt_to'])}, {_kept(r)}",
    "smtp_auth": _login,
    "pop3": _login,
    "imap": _login,
    "ftp": _login,
    "ftp_upload": lambda r: f"upload {r['name']!r}, {_kept(r)}",
    "ssh": lambda r: (f"{r['client_version']}, {len(r['logins'])} logins"
                      + "".join(f" {x['user']!r}/{x['password']!r}" for x in r["logins"])),
    "proxy": lambda r: " ".join(str(r[k]) for k in ("kind", "command", "target", "error") if r.get(k)),
    "websocket": lambda r: r.get("error") or f"{r['opcode']} message {r['size']} bytes sha256 {r['sha256'][:16]}..."
                                             f" {r['answered']}",
}


def _irc(rec: dict) -> str:
    command, nick = rec["command"], rec.get("nick", "")
    if command == "register":
        password = f" password {rec['password']!r}" if "password" in rec else ""
        return f"register nick {nick!r} user {rec.get('user', '')!r}{password}"
    if command == "JOIN":
        return f"{nick} joins {rec.get('channel', '')}" + (f" key {rec['key']!r}" if "key" in rec else "")
    if command in ("PRIVMSG", "NOTICE"):
        return f"{nick} {command} {rec.get('target', '')}: {rec.get('text', '')!r}"
    return f"{nick} {command} {rec.get('message', '')!r}"


def _tftp(rec: dict) -> str:
    if rec["operation"] == "read":
        return f"read {rec['file']!r}, {rec['size']} bytes served"
    return f"write {rec['file']!r}, {_kept(rec)}"


# The small services' records (services/default_udp.py, small_services.py), after the destination asked for.
_SMALL = {
    "ntp": lambda r: "answered" if r.get("answered") else "not a client request: no answer",
    "discard": lambda r: f"discarded {r['size']} bytes sha256 {r['sha256'][:16]}...",
    "finger": lambda r: f"query {r['query']!r}",
    "ident": lambda r: f"query {r['query']!r}",
    "syslog": lambda r: f"{r.get('severity', '-')}: {r['message'][:200]!r}",
    "tftp": _tftp,
    "irc": _irc,
    **dict.fromkeys(("time", "daytime", "qotd", "chargen"), lambda _r: "answered"),
    "custom": lambda r: (f"rule {r['rule']}: sent {r.get('sent', 0)} bytes, got {r.get('received', 0)}"
                         + (f", error: {r['error']}" if r.get("error") else "")),
}


def _asked(line):
    """The small service's line, after the destination asked for (the client's line names only the listener's side)."""
    return lambda rec: f"-> {rec.get('original_destination', '?')} {line(rec)}"


_SERVER_FIRST.update({event: _asked(line) for event, line in _SMALL.items()})


def _regular_file(stream: TextIO | None) -> tuple[int | None, int]:
    """(its file descriptor, its size) if `stream` writes to a regular file; (None, 0) otherwise."""
    try:
        fd = stream.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, os.lseek(fd, 0, os.SEEK_END)
    except (AttributeError, OSError, ValueError):
        pass
    return None, 0


# Records waiting to be written. A flood of new conversations (a port scan)
# may outrun a slow log target; beyond this many, records are dropped and
# counted instead of growing memory without bound.
QUEUE_LIMIT = 4096
PUT_WAIT = 5.0  # seconds a record waits for room in the queue before it is dropped (counted)
_NOTHING = object()


class ConversationLog:
    """A thread that writes records; drain() and close() write what waits.

    Counters: `written` records, `dropped` (the queue was full), `failed` (a
    record that could not be made, or could not be written once the target
    failed). A target that fails (disk full, EIO) is cut back to its last
    whole record and written no more: `on_error(exc)` hears of it, once.
    A listener's record may wait, briefly, for its conversation's start
    (logorder.py); with no target (`--log ""` and no `ship`) nothing is
    queued or counted. `ship` gets every record written (or, without a file,
    every record), as the JSON line it is or would be.
    """

    def __init__(self, stream: TextIO | None, as_json: bool, limit: int = QUEUE_LIMIT, *,
                 schema: Callable[[dict], dict] | None = None,
                 ship: Callable[[str, dict], None] | None = None,
                 dns_listeners: frozenset[str] = frozenset()) -> None:
        self._stream = stream
        self._json = as_json
        self._schema = schema  # the JSON records' field names (ecs.to_ecs), where they are written; None: ours
        self._ship = ship  # each record, as JSON, to the syslog collector too (it never waits)
        self._queue: queue.Queue[dict | threading.Event | Callable[[], None] | None] = queue.Queue(limit)
        self._order = StartsFirst(dns_listeners=dns_listeners)  # their conversations' `dns` questions
        self._thread = threading.Thread(target=self._run, name="nftdivert-log", daemon=True)
        self._abandon = False
        self.written = self.dropped = self.failed = 0
        self.on_error: Callable[[OSError], None] | None = None
        # (client address, time) -> the analysis it belongs to then, or None (tasks.TaskTable.owner).
        self.tasks: Callable[[str, float], str | None] | None = None
        self._conversation_tasks: OrderedDict[str, str | None] = OrderedDict()  # client -> its start's task
        # Each record written, in the log's order, in its thread: an analysis's own evidence.
        self.route: Callable[[dict], None] | None = None
        self.error: OSError | None = None
        self._file, self._whole = _regular_file(stream)  # where its last whole record ends
        self._thread.start()

    def put(self, rec: dict) -> None:
        if self._stream is None and self._ship is None:
            return
        if self.tasks is not None and "task" not in rec and rec.get("event") not in ("start", "end"):
            rec = self._tagged(rec)
        # Those who put are readers of other processes' pipes, never the packet path: under a
        # burst (a stop ends every live conversation at once: 22,000 in a lab) they wait for the
        # writer rather than lose records. Only a writer stuck for PUT_WAIT loses one, counted.
        try:
            self._queue.put(rec, timeout=PUT_WAIT)
        except queue.Full:
            self.dropped += 1

    def _tagged(self, rec: dict) -> dict:
        """A listener's or admission's record, with the task its client belongs to now (a
        conversation's own start and end carry the task of its start: observer_process.py)."""
        address = rec.get("client_address")
        if address is None and isinstance(rec.get("client"), str):
            address = split_endpoint(rec["client"])[0]
        try:
            return with_task(rec, self.tasks(address, time.time())) if address else rec
        except ValueError:  # not an address: nobody's
            return rec

    def dns_question(self, client: str, name: str, qtype: str, answer: str, rcode: str = "NOERROR",
                     profile: str | None = None) -> None:
        self.put(question_record(client, name, qtype, answer, rcode, profile))

    def dns_recycled(self, when: float, address: str, old_name: str, new_name: str) -> None:
        self.put(recycled_record(when, address, old_name, new_name))

    def event(self, rec: dict) -> None:
        """A record a listener made (a TLS handshake, an HTTP request): written as it is, stamped now."""
        self.put({"v": SCHEMA, "time": iso(time.time()), **rec})

    def _run(self) -> None:
        order = self._order
        while not self._abandon:
            try:
                item = self._queue.get(timeout=order.wait(time.monotonic()))
            except queue.Empty:
                item = _NOTHING  # a record waited long enough for its start
            if item is None:
                break
            if isinstance(item, threading.Event):  # drain(): the observer has stopped, no start comes
                for rec in order.flush():
                    self._write(rec)
                item.set()
                continue
            if callable(item):  # in_order(): after the records put before it that may go now
                for rec in order.due(time.monotonic()):
                    self._write(rec)
                item()
                continue
            now = time.monotonic()
            ready = order.due(now)
            if item is not _NOTHING:
                ready += order.add(item, now)
            for rec in ready:
                self._write(rec)
        if self._abandon:
            self.dropped += order.waiting
        else:
            for rec in order.flush():
                self._write(rec)

    def _write(self, rec: dict) -> None:
        if self.tasks is not None:
            rec = self._as_its_conversation(rec)
        if self.error is not None:
            self.failed += 1
            return
        try:
            as_json = json.dumps(self._schema(rec) if self._schema else rec) \
                if self._ship is not None or self._json else ""
            line = (as_json if self._json else text_line(rec)) + "\n"
        except (ValueError, KeyError, TypeError):
            self.failed += 1  # one odd record: the next may be fine
            return
        if self._stream is not None:
            try:
                self._stream.write(line)  # one write and a flush: whole records, as far as the target takes them
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self.failed += 1
                self._failed(exc if isinstance(exc, OSError) else OSError(str(exc)))
                return
            if self._file is not None:
                self._whole = os.lseek(self._file, 0, os.SEEK_CUR)
        if self._ship is not None:
            self._ship(as_json, rec)
        self.written += 1
        if self.route is not None and "task" in rec:
            self.route(rec)

    def in_order(self, call: Callable[[], None], timeout: float = PUT_WAIT) -> bool:
        """Call `call` in the writer's thread once the records put before it are written (those
        that still wait for their conversation's start excepted); False if it could not be queued."""
        if self._stream is None:
            call()
            return True
        try:
            self._queue.put(call, timeout=timeout)
        except queue.Full:
            return False
        return True

    def _as_its_conversation(self, rec: dict) -> dict:
        """A listener's record takes the task of its conversation's start, written before it
        (logorder.py), over its client's task when it was made: a late record of an ended
        task's conversation stays that task's, though its address went to another since."""
        event, client = rec.get("event"), rec.get("client")
        if event == "start":
            self._conversation_tasks[client] = rec.get("task")
            self._conversation_tasks.move_to_end(client)
            if len(self._conversation_tasks) > LIVE_LIMIT:
                self._conversation_tasks.popitem(last=False)
        elif event == "end":
            self._conversation_tasks.pop(client, None)
        elif client in self._conversation_tasks:
            return with_task(rec, self._conversation_tasks[client])
        return rec

    def drain(self, timeout: float = 10) -> None:
        """Write what is queued and what waits for a start (none comes once the observer has
        stopped); returns once written, or after `timeout` seconds."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def _failed(self, exc: OSError) -> None:
        """The target failed: cut a file back to its last whole record, send what is still
        buffered nowhere (it would fail again at close), and say so once."""
        self.error = exc
        try:
            fd = self._stream.fileno()
            if self._file is not None:
                os.ftruncate(fd, self._whole)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError):
            pass  # a stream without a file descriptor, or one already closed
        if self.on_error is not None:
            self.on_error(exc)

    def close(self, timeout: float = 10) -> None:
        """Write what is queued, for at most `timeout` seconds; the rest is dropped."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            self._abandon = True
            self.dropped += self._queue.qsize()
        self._thread.join(timeout=timeout)
