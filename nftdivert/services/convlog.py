"""The conversation log: one line per new diverted conversation.

The queue thread only hands over what it saw; this module's thread asks
conntrack for the original destination (the foreign address the client asked
for, which NAT has replaced by the time the worker sees the packet) and
writes JSON Lines or a human-readable line. A conversation's first packet is
not yet confirmed in conntrack while it sits in the queue, hence a thread
with retries rather than a lookup on the hot path.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import TextIO

PROTOCOL_NAMES = {6: "tcp", 17: "udp"}


@dataclass(frozen=True)
class NewConversation:
    """What the queue thread knows of a new conversation, as raw values."""

    wall_time: float
    version: int
    protocol: int
    client: bytes
    client_port: int
    local: bytes
    original_port: int
    listener_name: str
    listener_port: int
    indev: int
    # Known already when the worker learned the conversation from conntrack.
    original: tuple[bytes, int] | None = None


def _addr(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _interface(index: int) -> str:
    if not index:
        return ""
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def record(event: NewConversation, original: tuple[bytes, int] | None, name: str | None = None) -> dict:
    """The log record: JSON-ready, field names stable (scripts read them)."""
    dst_addr, dst_port, source = ((original[0], original[1], "conntrack") if original
                                  else (event.local, event.original_port, "packet"))
    rec = {
        "time": _iso(event.wall_time),
        "protocol": PROTOCOL_NAMES.get(event.protocol, str(event.protocol)),
        "client": _endpoint(_addr(event.client), event.client_port),
        "original_destination": _endpoint(_addr(dst_addr), dst_port),
        "original_destination_from": source,
        "listener": event.listener_name,
        "listener_port": event.listener_port,
        "interface": _interface(event.indev),
    }
    if name:
        rec["name"] = name  # the DNS name the built-in resolver gave this address for
    return rec


def question_record(client: str, name: str, qtype: str, answer: str, rcode: str = "NOERROR") -> dict:
    return {"time": _now_iso(), "event": "dns", "client": client, "name": name, "type": qtype,
            "answer": answer, "rcode": rcode}


def recycled_record(when: float, address: str, old_name: str, new_name: str) -> dict:
    """The DNS pool was full: `address` stopped standing for old_name and now stands for new_name."""
    return {"time": _iso(when), "event": "dns_recycled", "address": address, "old_name": old_name,
            "new_name": new_name}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _now_iso() -> str:
    return _iso(time.time())


def text_line(rec: dict) -> str:
    if rec.get("event") == "dns":
        answer = rec["answer"] or (rec["rcode"] if rec.get("rcode", "NOERROR") != "NOERROR" else "")
        return (f"{rec['time'][11:23]}  dns  {rec['client']:>22} asked {rec['type']} {rec['name']}"
                f"{' -> ' + answer if answer else ''}")
    if rec.get("event") == "dns_recycled":
        return (f"{rec['time'][11:23]}  dns  pool full: {rec['address']} now stands for {rec['new_name']}"
                f" (was {rec['old_name']})")
    if rec.get("event") in ("tls", "http"):
        return _service_line(rec)
    named = f" ({rec['name']})" if rec.get("name") else ""
    where = f" via {rec['interface']}" if rec["interface"] else ""
    return (f"{rec['time'][11:23]}  {rec['protocol']:<3}  {rec['client']:>22} -> "
            f"{rec['original_destination']:<22}{named} => {rec['listener']} (:{rec['listener_port']}){where}")


def _service_line(rec: dict) -> str:
    head = f"{rec['time'][11:23]}  {rec['event']:<4} {rec.get('client', ''):>22}"
    if rec.get("error") and rec["event"] == "http":
        return f"{head} bad request: {rec['error']}"
    if rec["event"] == "tls":
        offered = ",".join(rec.get("alpn_offered", []))
        result = "ok" if rec.get("result") == "ok" else f"failed: {rec.get('error', '')}"
        return (f"{head} sni={rec.get('sni', '-')} alpn={offered or '-'} "
                f"version={rec.get('version') or rec.get('client_version', '-')} {result}")
    saved = f" saved {rec['body_saved']}" if rec.get("body_saved") else ""
    return (f"{head} {rec['method']} {rec['url']} -> {rec['status']}, body {rec['body_size']} bytes"
            f" sha256 {rec['body_sha256'][:16]}...{saved}")


# Events waiting for their line. A flood of new conversations (a port scan)
# outruns the conntrack lookups; beyond this many, lines are dropped and
# counted instead of growing memory without bound.
QUEUE_LIMIT = 4096


class ConversationLog:
    """A thread that resolves and writes log lines; close() drains it.

    Counters: `written` lines, `dropped` (the queue was full), `failed` (an
    event that raised; the thread logs the next one all the same).
    """

    def __init__(self, stream: TextIO | None, as_json: bool, lookup=None, retries: int = 10,
                 name_for=None, limit: int = QUEUE_LIMIT) -> None:
        self._stream = stream
        self._name_for = name_for  # (address, wall time) -> the DNS name it stood for then, if any
        self._json = as_json
        self._lookup = lookup  # (version, protocol, client, cport, local, lport) -> conntrack.Entry | None
        self._retries = retries
        self._queue: queue.Queue[NewConversation | dict | None] = queue.Queue(limit)
        self._thread = threading.Thread(target=self._run, name="nftdivert-log", daemon=True)
        self._abandon = False
        self.written = self.dropped = self.failed = 0
        self._thread.start()

    def _put(self, item: NewConversation | dict) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def submit(self, event: NewConversation) -> None:
        self._put(event)

    def dns_question(self, client: str, name: str, qtype: str, answer: str, rcode: str = "NOERROR") -> None:
        self._put(question_record(client, name, qtype, answer, rcode))

    def dns_recycled(self, when: float, address: str, old_name: str, new_name: str) -> None:
        self._put(recycled_record(when, address, old_name, new_name))

    def event(self, rec: dict) -> None:
        """A record a listener made (a TLS handshake, an HTTP request): written as it is, stamped now."""
        self._put({"time": _now_iso(), **rec})

    def _resolve(self, ev: NewConversation) -> tuple[NewConversation, tuple[bytes, int] | None]:
        """The event with the client's own port, and the original destination, as conntrack says."""
        if ev.original is not None or self._lookup is None:
            return ev, ev.original
        for attempt in range(self._retries):
            try:
                found = self._lookup(ev.version, ev.protocol, ev.client, ev.client_port, ev.local, ev.original_port)
            except OSError:
                return ev, None
            if found is not None:
                # In local mode the kernel may have remapped the client's port
                # before the worker saw the packet; the log names the client's own.
                return replace(ev, client_port=found.src_port), (found.dst, found.dst_port)
            time.sleep(0.01 * (attempt + 1))
        return ev, None

    def _run(self) -> None:
        while not self._abandon and (ev := self._queue.get()) is not None:
            try:
                self._write(ev)
            except Exception:  # noqa: BLE001 - one bad event must not end the log
                self.failed += 1

    def _write(self, ev: NewConversation | dict) -> None:
        if isinstance(ev, dict):
            rec = ev
        else:
            ev, original = self._resolve(ev)
            name = None
            if self._name_for is not None:
                name = self._name_for(ipaddress.ip_address(original[0] if original else ev.local), ev.wall_time)
            rec = record(ev, original, name)
        if self._stream is not None:
            try:
                self._stream.write((json.dumps(rec) if self._json else text_line(rec)) + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                self.failed += 1  # a closed terminal must not take the worker down
                return
        self.written += 1

    def close(self, timeout: float = 10) -> None:
        """Write what is queued, for at most `timeout` seconds; the rest is dropped."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            self._abandon = True
            self.dropped += self._queue.qsize()
        self._thread.join(timeout=timeout)
