"""conntrack's NEW and DESTROY events, and a dump of the live entries, over ctnetlink.

The conversation log is fed from here: conntrack already knows every
conversation the ruleset answers (its original tuple, and with accounting on
its counters and start and stop times), so the log never sits on a packet's
path. Only entries carrying the ruleset's ct mark bit are nftdivert's; the
caller filters on `mark` and leaves every other entry alone.

Hand-written on top of conntrack.py's netlink helpers rather than pyroute2:
measured, pyroute2 decodes an event in about 195 us and this module in about
25 us (see the README, "The conversation log").
"""
from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

from nftdivert.observers.conntrack import (
    CTA_ID, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, NETLINK_NETFILTER,
    NFGENMSG, NFNETLINK_V0, NFNL_SUBSYS_CTNETLINK, NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN,
    NLMSGHDR, NLM_F_REQUEST, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC, CTA_PROTO_DST_PORT,
    CTA_PROTO_SRC_PORT, NetlinkFormatError, _align, _nested, _u32, nla, parse_attrs, unsigned)

# linux/netfilter/nfnetlink_compat.h: the multicast groups, as bind() takes them.
NF_NETLINK_CONNTRACK_NEW = 0x1
NF_NETLINK_CONNTRACK_DESTROY = 0x4
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2  # a DESTROY event
NLM_F_DUMP = 0x300

# linux/netfilter/nfnetlink_conntrack.h
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_TIMESTAMP_EVENT = 27  # Linux 6.2+: when the event happened (wall clock, ns)
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2
CTA_TIMESTAMP_START = 1
CTA_TIMESTAMP_STOP = 2
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTO_NUM = 1
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
# enum tcp_conntrack (linux/netfilter/nf_conntrack_tcp.h)
TCP_TIME_WAIT, TCP_CLOSE = 7, 8

# Events come in bursts (a port scan opens thousands of entries a second):
# a large receive buffer rides them out; what still overflows is counted.
# An event takes 1,280 bytes of it. Measured on the kernel path, a 100,000-SYN
# flood (65,000 conversations, 130,000 events in 7 s) lost 100,000 events
# with 8 MiB, 16,000 with 32 and none with 64; the kernel doubles the value,
# and the memory is taken only while events wait.
RECV_BUFFER = 1 << 16
SOCKET_BUFFER = 64 << 20
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55  # asm-generic/socket.h: u32 counters, SK_MEMINFO_* (linux/sock_diag.h)
SK_MEMINFO_DROPS, SK_MEMINFO_VARS = 8, 9


@dataclass(frozen=True)
class Counters:
    packets: int
    bytes: int


@dataclass(frozen=True)
class CtEvent:
    """One conntrack entry as an event or a dump reports it.

    kind: "new", "destroy", or "live" (from a dump: still tracked).
    The ORIGINAL tuple is the client's view: src is the client, dst what it
    asked for. reply_src is where conntrack's NAT sent it (our address; the
    redirect keeps the port). ICMP has no ports: icmp is (type, code, id).
    Nor has a protocol conntrack tracks generically (an IP protocol such as
    253): its ports are None.
    """

    kind: str
    id: int
    version: int
    protocol: int
    src: bytes
    src_port: int | None
    dst: bytes
    dst_port: int | None
    reply_src: bytes
    reply_src_port: int | None
    mark: int
    icmp: tuple[int, int, int] | None = None
    sent: Counters | None = None  # client -> us; with nf_conntrack_acct on
    received: Counters | None = None
    start_ns: int = 0  # wall clock, with nf_conntrack_timestamp on; 0 unknown
    stop_ns: int = 0
    event_ns: int = 0  # when the kernel sent the event; 0 unknown
    tcp_state: int | None = None


def _u64(attrs, attr_type: int) -> int:
    return unsigned(attrs, attr_type, 8)


def _u8(attrs, attr_type: int) -> int:
    value = attrs.get(attr_type)
    if value is None or len(value) < 1:
        raise NetlinkFormatError(f"attribute {attr_type} missing")
    return value[0]


def _address(ip, which: str) -> bytes:
    v4, v6 = (CTA_IP_V4_SRC, CTA_IP_V6_SRC) if which == "source" else (CTA_IP_V4_DST, CTA_IP_V6_DST)
    found, size = (ip[v4], 4) if v4 in ip else (ip.get(v6), 16)
    if found is None or len(found) != size:
        raise NetlinkFormatError(f"no {which} address in CTA_TUPLE_IP")
    return bytes(found)


def _port(proto, attr_type: int, which: str, required: bool = True) -> int | None:
    value = proto.get(attr_type)
    if value is None and not required:
        return None
    if value is None or len(value) != 2:
        raise NetlinkFormatError(f"{which} port missing or not 2 bytes")
    return struct.unpack("!H", value)[0]


def _tuple(attrs, attr_type: int, name: str):
    """(src, src_port, dst, dst_port, protocol, icmp) of one CTA_TUPLE_*."""
    tup = _nested(attrs, attr_type, name)
    ip = _nested(tup, CTA_TUPLE_IP, "CTA_TUPLE_IP")
    proto = _nested(tup, CTA_TUPLE_PROTO, "CTA_TUPLE_PROTO")
    protocol = _u8(proto, CTA_PROTO_NUM)
    src, dst = _address(ip, "source"), _address(ip, "destination")
    if protocol in (ICMP, ICMPV6):
        kind, code, ident = ((CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID) if protocol == ICMP
                             else (CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE, CTA_PROTO_ICMPV6_ID))
        return src, 0, dst, 0, protocol, (_u8(proto, kind), _u8(proto, code), _port(proto, ident, "icmp id"))
    # TCP and UDP always have ports; a protocol conntrack tracks generically has
    # none (SCTP, DCCP, UDP-Lite and GRE with its helper report theirs).
    required = protocol in (TCP, UDP)
    return (src, _port(proto, CTA_PROTO_SRC_PORT, "source", required), dst,
            _port(proto, CTA_PROTO_DST_PORT, "destination", required), protocol, None)


def _counters(attrs, attr_type: int) -> Counters | None:
    if attr_type not in attrs:
        return None
    nested = parse_attrs(attrs[attr_type])
    return Counters(_u64(nested, CTA_COUNTERS_PACKETS), _u64(nested, CTA_COUNTERS_BYTES))


def _tcp_state(attrs) -> int | None:
    if CTA_PROTOINFO not in attrs:
        return None
    tcp = parse_attrs(attrs[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP)
    if tcp is None:
        return None
    state = parse_attrs(tcp).get(CTA_PROTOINFO_TCP_STATE)
    return state[0] if state is not None and len(state) == 1 else None


def parse_event(kind: str, payload: bytes | memoryview, mark: int = 0) -> CtEvent | None:
    """The CtEvent in one ctnetlink entry message body (after the nlmsghdr).

    With `mark`: None for an entry without any of its bits, read no further
    (the host's own conversations cost one level of parsing, not seven).
    """
    view = memoryview(payload)
    if len(view) < NFGENMSG.size:
        raise NetlinkFormatError("message shorter than nfgenmsg")
    top = parse_attrs(view[NFGENMSG.size:])
    if mark and not _u32(top, CTA_MARK) & mark:
        return None
    src, sport, dst, dport, protocol, icmp = _tuple(top, CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG")
    rsrc, rsport, _rdst, _rdport, _p, _i = _tuple(top, CTA_TUPLE_REPLY, "CTA_TUPLE_REPLY")
    stamps = parse_attrs(top[CTA_TIMESTAMP]) if CTA_TIMESTAMP in top else {}
    return CtEvent(
        kind=kind, id=_u32(top, CTA_ID), version=4 if len(src) == 4 else 6, protocol=protocol,
        src=src, src_port=sport, dst=dst, dst_port=dport, reply_src=rsrc, reply_src_port=rsport,
        mark=_u32(top, CTA_MARK), icmp=icmp,
        sent=_counters(top, CTA_COUNTERS_ORIG), received=_counters(top, CTA_COUNTERS_REPLY),
        start_ns=_u64(stamps, CTA_TIMESTAMP_START), stop_ns=_u64(stamps, CTA_TIMESTAMP_STOP),
        event_ns=_u64(top, CTA_TIMESTAMP_EVENT),
        tcp_state=_tcp_state(top))


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(type, flags, payload) of each netlink message in one datagram."""
    view = memoryview(data)
    offset = 0
    while offset + NLMSGHDR.size <= len(view):
        length, msg_type, flags, _seq, _pid = NLMSGHDR.unpack_from(view, offset)
        if length < NLMSGHDR.size or offset + length > len(view):
            raise NetlinkFormatError(f"message length {length} at offset {offset} of {len(view)}")
        yield msg_type, flags, view[offset + NLMSGHDR.size:offset + length]
        offset += _align(length, NLMSG_ALIGNTO)


def event_kind(msg_type: int) -> str | None:
    """"new" or "destroy" for a ctnetlink entry message, None for anything else."""
    if msg_type >> 8 != NFNL_SUBSYS_CTNETLINK:
        return None
    return {IPCTNL_MSG_CT_NEW: "new", IPCTNL_MSG_CT_DELETE: "destroy"}.get(msg_type & 0xFF)


def build_dump_request(family: int, mark: int, seq: int = 1) -> bytes:
    """CT_GET dump of the entries whose mark has `mark`'s bits (the kernel filters)."""
    body = (NFGENMSG.pack(family, NFNETLINK_V0, 0)
            + nla(CTA_MARK, struct.pack("!I", mark)) + nla(CTA_MARK_MASK, struct.pack("!I", mark)))
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


class EventSocket:
    """A ctnetlink socket subscribed to NEW and DESTROY events in this namespace.

    `lost` counts the events the kernel dropped because our receive queue was
    full (the socket's drop counter, one per event): those conversations miss
    a start or an end record. `overflows` counts the times it said so (ENOBUFS).
    """

    def __init__(self, buffer: int = SOCKET_BUFFER) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
            sock.bind((0, NF_NETLINK_CONNTRACK_NEW | NF_NETLINK_CONNTRACK_DESTROY))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.overflows = 0
        self._lost = 0
        self._buffer = bytearray(RECV_BUFFER)

    @property
    def lost(self) -> int:
        """Events the kernel dropped for us; the last count read once closed."""
        if self.sock.fileno() >= 0:
            self._lost = dropped(self.sock, self.overflows)
        return self._lost

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.lost  # noqa: B018 - the final count, while the socket can still tell it
        self.sock.close()

    def read(self) -> list[tuple[str, memoryview]]:
        """One datagram's events as (kind, payload); [] if none is waiting."""
        while True:
            try:
                size = self.sock.recv_into(self._buffer, flags=socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                return []
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflows += 1  # said once; what was queued before is still there
        # A copy: the next read reuses the buffer.
        data = bytes(self._buffer[:size])
        return [(kind, payload) for msg_type, _flags, payload in messages(data)
                if (kind := event_kind(msg_type)) is not None]


def dropped(sock: socket.socket, fallback: int) -> int:
    """The socket's drop counter (SO_MEMINFO): netlink counts each message it
    could not queue. `fallback` (the ENOBUFS count, a lower bound) where the
    kernel cannot tell."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return fallback
    if len(info) < 4 * (SK_MEMINFO_DROPS + 1):
        return fallback
    return struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]


@dataclass
class Dump:
    """What a dump found: the live entries, and how many it could not read."""

    live: list[CtEvent]
    unreadable: int = 0


def dump_marked(mark: int, timeout: float = 2.0) -> Dump:
    """The live entries of this namespace that carry `mark`'s bits, both families.

    An entry that does not parse is skipped and counted: one odd entry must
    not cost every other conversation its end record. Dumping also makes the
    kernel reap entries that have expired (their DESTROY events follow).
    """
    dump = Dump([])
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as sock:
        sock.bind((0, 0))
        sock.settimeout(timeout)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            sock.send(build_dump_request(family, mark, seq))
            _read_dump(sock, seq, dump)
    return dump


def _read_dump(sock: socket.socket, seq: int, dump: Dump) -> None:
    while True:
        data = sock.recv(RECV_BUFFER)
        for msg_type, _flags, payload in messages(data):
            if msg_type == NLMSG_DONE:
                return
            if msg_type == NLMSG_OVERRUN:
                raise OSError(errno.ENOBUFS, "ctnetlink dump overrun")
            if msg_type == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", payload)
                if error:
                    raise OSError(-error, f"ctnetlink dump: {errno.errorcode.get(-error, error)}")
                return
            if event_kind(msg_type) == "new":  # a dump answers with CT_NEW messages
                try:
                    dump.live.append(parse_event("live", payload))
                except NetlinkFormatError:
                    dump.unreadable += 1
