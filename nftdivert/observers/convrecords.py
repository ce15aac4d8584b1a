"""Conntrack events -> conversation log records (pure).

A conversation gets exactly one `start` record (from conntrack's NEW event)
and one `end` record (its DESTROY event, or the dump at stop for what is
still tracked then). Every record carries the schema version `v`; docs/reference/log-schema.md
documents every field.
"""
from __future__ import annotations

import ipaddress
import time
from typing import Callable

from nftdivert.netlink.ctnetlink import TCP_CLOSE, TCP_TIME_WAIT, CtEvent
from nftdivert.netlink.ipproto import ICMP, ICMPV6, TCP, UDP
from nftdivert.observers.flowid import community_id

SCHEMA = 1
PROTOCOL_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmpv6"}
KERNEL = "kernel"  # the listener of an ICMP echo: the kernel answers it
HOST = "host"  # a service on this host that is not one of nftdivert's listeners


def iso(t: float) -> str:
    """UTC, to the millisecond (rounded: 0.25 s is not shown as .249 for a float a hair below it)."""
    seconds, ms = divmod(round(t * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def address(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def endpoint(raw: bytes, port: int | None) -> str:
    """"192.0.2.1:80", "[2001:db8::1]:80", or the bare address for ICMP (port None)."""
    addr = address(raw)
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def split_endpoint(text: str) -> tuple[str, int | None]:
    """"[2001:db8::1]:53" -> ("2001:db8::1", 53); an ICMP endpoint has no port."""
    if text.startswith("["):
        addr, _, port = text[1:].partition("]:")
        return addr, int(port)
    if text.count(":") == 1:
        addr, _, port = text.partition(":")
        return addr, int(port)
    return text, None


def has_start(end: dict) -> bool:
    """Whether the observer had this end record's start: it then carries the start's `listener`."""
    return "listener" in end


def named(rec: dict, name: str) -> dict:
    """The record with `name`, in its place: after the destination (and icmp)."""
    out = {}
    for key, value in rec.items():
        if key in ("listener", "duration") and "name" not in out:
            out["name"] = name
        out[key] = value
    out.setdefault("name", name)
    return out


def with_task(rec: dict, task: str | None) -> dict:
    """The record with its analysis's `task`, after the client; without one for None."""
    return _after_client(rec, "task", task)


def with_profile(rec: dict, profile: str | None) -> dict:
    """The record with the [[profiles]] name that answers its client, after the client (and
    before a task added later); without one for None."""
    return _after_client(rec, "profile", profile)


def _after_client(rec: dict, field: str, value: str | None) -> dict:
    if rec.get(field) == value:
        return rec
    out = {}
    for key, item in rec.items():
        if key != field:
            out[key] = item
        if key == "client_address" and value is not None:
            out[field] = value
    if value is not None:
        out.setdefault(field, value)
    return out


def _port(ev: CtEvent, port: int) -> int | None:
    return None if ev.icmp is not None else port


def diverted(ev: CtEvent, queued_mark: int, kernel_path: bool) -> bool | None:
    """Whether the kernel sent this conversation to the default listener, as its NEW event tells.

    The kernel path's `redirect to :PORT` shows in the reply tuple: its
    source port is the listener's, where a bound port keeps the one asked
    for. The queue path sets `queued_mark` on what it queues to the worker
    (in divert_unbound, at input, before conntrack confirms the entry and
    sends NEW), and the worker rewrites it to the default listener. In local
    mode the entry is confirmed on the way out, before the packet comes back
    in through lo to divert_unbound: its NEW event cannot tell (None).
    """
    if kernel_path:
        return ev.reply_src_port != ev.dst_port
    if ev.mark & queued_mark:
        return True
    return None if ipaddress.ip_address(ev.reply_src).is_loopback else False


def listener_for(ev: CtEvent, listeners: dict[tuple[int, int], str], defaults: dict[int, tuple[str, int]],
                 is_bound: Callable[[int, bytes, int], bool], sent: bool | None) -> tuple[str, int | None]:
    """(listener, its port) that answered: ours on that port, a host service, or the default one.

    `listeners`: (protocol, port) -> name of nftdivert's own; `defaults`:
    protocol -> (name, port) of the default listener; `sent`: diverted(),
    the kernel's own answer. Where the kernel kept the port although a default
    listener exists, something is bound there. Only where the kernel cannot
    tell (no default listener: bound, or refused; local mode on the queue
    path) is the host's view of its sockets asked: `is_bound`, which must be
    no older than the conversation.
    """
    if ev.icmp is not None:
        return KERNEL, None
    port, default = ev.reply_src_port, defaults.get(ev.protocol)
    if sent and default is not None:
        return default
    if (sent is False and default is not None) or is_bound(ev.protocol, ev.reply_src, port):
        return listeners.get((ev.protocol, port), HOST), port
    return default or ("", None)  # no default listener: the kernel refuses it


def listener_client_port(ev: CtEvent) -> int | None:
    """The client port the listener sees, when the kernel gave the conversation
    another than the client's (conntrack's reply tuple names it); else None."""
    if ev.icmp is not None or ev.reply_dst_port is None or ev.reply_dst_port == ev.src_port:
        return None
    return ev.reply_dst_port


def identity(ev: CtEvent) -> dict:
    rec = {
        "protocol": PROTOCOL_NAMES.get(ev.protocol, str(ev.protocol)),
        "client": endpoint(ev.src, _port(ev, ev.src_port)),
        "client_address": address(ev.src),  # the client without its port: what a per-client filter wants
    }
    seen = listener_client_port(ev)
    if seen is not None:
        rec["listener_client_port"] = seen
    rec["original_destination"] = endpoint(ev.dst, _port(ev, ev.dst_port))
    # The tuple the client asked for, as the pcap and other tools see it (ICMP: its type and code).
    rec["community_id"] = community_id(ev.protocol, ev.src, ev.dst, *(ev.icmp[:2] if ev.icmp is not None
                                                                     else (ev.src_port, ev.dst_port)))
    if ev.icmp is not None:
        rec["icmp"] = {"type": ev.icmp[0], "code": ev.icmp[1], "id": ev.icmp[2]}
    return rec


def conversation_key(rec: dict) -> tuple:
    """What pairs a start with its end (conntrack's id alone is a 32-bit hash two may share)."""
    return rec["id"], rec["client"], rec["original_destination"]


def event_key(ev: CtEvent) -> tuple:
    """conversation_key of the records an event makes."""
    return conversation_key({"id": ev.id, **identity(ev)})


def start_time(ev: CtEvent, received: float) -> float:
    """When the conversation began: conntrack's own stamp if it sent one."""
    return (ev.start_ns or ev.event_ns) / 1e9 or received


def start_record(ev: CtEvent, when: float, listener: tuple[str, int | None], interface: str,
                 name: str | None = None, process: dict | None = None) -> dict:
    rec = {"v": SCHEMA, "time": iso(when), "event": "start", "id": ev.id, **identity(ev)}
    if name:
        rec["name"] = name  # the name the DNS listener gave this address, as of `when`
    rec["listener"], port = listener
    if port is not None:
        rec["listener_port"] = port
    rec["interface"] = interface
    if process is not None:
        rec["process"] = process
    return rec


def ended(ev: CtEvent) -> str:
    """How it ended, as far as conntrack can tell."""
    if ev.protocol == TCP and ev.tcp_state == TCP_TIME_WAIT:
        return "closed"
    if ev.protocol == TCP and ev.tcp_state == TCP_CLOSE:
        return "reset"
    return "open" if ev.kind == "live" else "timeout"


def _counters(c) -> dict | None:
    return None if c is None else {"packets": c.packets, "bytes": c.bytes}


def end_record(ev: CtEvent, now: float, start: dict | None = None, started: float | None = None) -> dict:
    """The end record; `start` is this conversation's start record (its name and listener), if written.

    duration: conntrack's start to stop stamps when it sent them (a DESTROY
    with nf_conntrack_timestamp on), else from `started` (or the start
    record's time) until `now`.
    """
    if ev.start_ns and ev.stop_ns:
        duration = (ev.stop_ns - ev.start_ns) / 1e9
    else:
        begin = ev.start_ns / 1e9 if ev.start_ns else started
        duration = max(0.0, now - begin) if begin else None
    rec = {"v": SCHEMA, "time": iso(ev.stop_ns / 1e9 if ev.stop_ns else now), "event": "end", "id": ev.id,
           **identity(ev)}
    if start is not None:
        for key in ("name", "listener", "listener_port", "interface"):
            if key in start:
                rec[key] = start[key]
    rec.update({"duration": None if duration is None else round(duration, 3),
                "sent": _counters(ev.sent), "received": _counters(ev.received), "ended": ended(ev)})
    return rec


def synthesized_end(start: dict, now: float) -> dict:
    """The end of a conversation conntrack forgot without a DESTROY event the observer read.

    Only its start is known: how and when it ended and its counters are not
    (`ended` is "unknown"; duration, sent and received are null).
    """
    rec = {key: value for key, value in start.items() if key != "process"}
    rec.update({"time": iso(now), "event": "end", "duration": None, "sent": None, "received": None,
                "ended": "unknown"})
    return rec
