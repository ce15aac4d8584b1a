"""ctnetlink: conntrack's entries, looked up, dumped, and as NEW and DESTROY events.

Lookups. After an nftables `redirect` at prerouting the worker only ever
sees the diverter's own address as destination; the address the client
asked for lives on in the entry's ORIGINAL tuple. The worker knows the
packet as the kernel delivered it, after NAT: client:client_port ->
local:port. That is exactly the entry's REPLY tuple turned around, and the
kernel finds an entry by either of its tuples, so one CT_GET with
CTA_TUPLE_REPLY suffices. The same GET also finds a conversation whose
client port the kernel itself remapped (its reply tuple then names the new
port); see `Conntrack.entry`. Entries are only in the table once confirmed,
i.e. after the first packet passed the last netfilter hook: the worker asks
only at a listener's reply, by which time the entry is there.

Events and dumps feed the conversation log: conntrack already knows every
conversation the ruleset answers (its original tuple, and with accounting
on its counters and start and stop times), so the log never sits on a
packet's path. Only entries carrying the ruleset's ct mark bit are
nftdivert's; the caller filters on `mark` and leaves every other entry alone.

Hand-written rather than pyroute2 (or libnetfilter_conntrack): measured,
pyroute2 decodes an event in about 195 us and this module in about 25 us
(docs/reference/log-schema.md).
"""
from __future__ import annotations

import errno
import socket
import struct
import threading
from dataclasses import dataclass
from typing import NamedTuple

from nftdivert.netlink.codec import (
    NETLINK_NETFILTER, NFGENMSG, NFNETLINK_V0, NLM_F_ACK, NLM_F_REQUEST, NetlinkError, NetlinkFormatError,
    answers, attr, attrs, dump, message, messages, open_socket)
from nftdivert.netlink.ipproto import ICMP, ICMPV6, TCP, UDP

# linux/netfilter/nfnetlink.h, nfnetlink_compat.h (the multicast groups, as bind() takes them)
NFNL_SUBSYS_CTNETLINK = 1
NF_NETLINK_CONNTRACK_NEW = 0x1
NF_NETLINK_CONNTRACK_DESTROY = 0x4

# linux/netfilter/nfnetlink_conntrack.h
IPCTNL_MSG_CT_NEW = 0  # event and dump messages describing an entry
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2  # a DESTROY event
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_TIMESTAMP_EVENT = 27  # Linux 6.2+: when the event happened (wall clock, ns)
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_PROTO_ICMPV6_ID, CTA_PROTO_ICMPV6_TYPE, CTA_PROTO_ICMPV6_CODE = 7, 8, 9
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2
CTA_TIMESTAMP_START = 1
CTA_TIMESTAMP_STOP = 2
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
IPS_SEEN_REPLY = 1 << 1  # linux/netfilter/nf_conntrack_common.h
# enum tcp_conntrack (linux/netfilter/nf_conntrack_tcp.h)
TCP_TIME_WAIT, TCP_CLOSE = 7, 8

DEFAULT_TIMEOUT = 1.0  # seconds; the kernel answers a lookup at once or never
# Events come in bursts (a port scan opens thousands of entries a second):
# a large receive buffer rides them out; what still overflows is counted.
# An event takes 1,280 bytes of it. Measured on the kernel path, a 100,000-SYN
# flood (65,000 conversations, 130,000 events in 7 s) lost 100,000 events
# with 8 MiB, 16,000 with 32 and none with 64; the kernel doubles the value,
# and the memory is taken only while events wait.
SOCKET_BUFFER = 64 << 20
RECV_BUFFER = 1 << 16
SO_MEMINFO = 55  # asm-generic/socket.h: u32 counters, SK_MEMINFO_* (linux/sock_diag.h)
SK_MEMINFO_DROPS, SK_MEMINFO_VARS = 8, 9

_FAMILY = {4: (socket.AF_INET, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST), 6: (socket.AF_INET6, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST)}
_ENTRY = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW
_KINDS = {_ENTRY: "new", NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE: "destroy"}


class Entry(NamedTuple):
    """What one lookup says: the entry's ORIGINAL tuple, the client's side of
    the conversation before any NAT, and two facts about the entry itself."""

    src: bytes  # the client
    src_port: int  # the client's own port (the kernel may have remapped it since)
    dst: bytes  # the destination the client asked for
    dst_port: int
    id: int  # CTA_ID, 0 when the kernel sent none
    seen_reply: bool  # a reply has already passed conntrack (IPS_SEEN_REPLY)
    mark: int = 0  # the entry's ct mark


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
    # The client's port in the reply tuple: the one the listener sees. Not
    # src_port when the kernel gave the conversation another at input NAT
    # (its reply tuple was taken: the same client port towards another address).
    reply_dst_port: int | None = None


class ConntrackError(NetlinkError):
    """ctnetlink failed for a reason other than "no such entry"."""


# -- parsing ------------------------------------------------------------------

def unsigned(found: dict[int, memoryview], attr_type: int, size: int) -> int:
    """A big-endian unsigned attribute of `size` bytes; 0 when absent."""
    value = found.get(attr_type)
    if value is None:
        return 0
    if len(value) != size:
        raise NetlinkFormatError(f"attribute {attr_type} of {len(value)} bytes, not {size}")
    return int.from_bytes(value, "big")


def _u8(found, attr_type: int) -> int:
    value = found.get(attr_type)
    if value is None or len(value) < 1:
        raise NetlinkFormatError(f"attribute {attr_type} missing")
    return value[0]


def _nested(found, attr_type: int, name: str) -> dict[int, memoryview]:
    if attr_type not in found:
        raise NetlinkFormatError(f"{name} missing")
    return attrs(found[attr_type])


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


def _tuple(top, attr_type: int, name: str):
    """(src, src_port, dst, dst_port, protocol, icmp) of one CTA_TUPLE_*."""
    tup = _nested(top, attr_type, name)
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


def _top(payload: bytes | memoryview) -> dict[int, memoryview]:
    view = memoryview(payload)
    if len(view) < NFGENMSG.size:
        raise NetlinkFormatError("message shorter than nfgenmsg")
    return attrs(view[NFGENMSG.size:])


def parse_entry(payload: bytes | memoryview) -> Entry:
    """The Entry in a ctnetlink entry message body (after the nlmsghdr)."""
    top = _top(payload)
    src, src_port, dst, dst_port, _protocol, _icmp = _tuple(top, CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG")
    return Entry(src, src_port or 0, dst, dst_port or 0, unsigned(top, CTA_ID, 4),
                 bool(unsigned(top, CTA_STATUS, 4) & IPS_SEEN_REPLY), unsigned(top, CTA_MARK, 4))


def _counters(top, attr_type: int) -> Counters | None:
    if attr_type not in top:
        return None
    nested = attrs(top[attr_type])
    return Counters(unsigned(nested, CTA_COUNTERS_PACKETS, 8), unsigned(nested, CTA_COUNTERS_BYTES, 8))


def _tcp_state(top) -> int | None:
    if CTA_PROTOINFO not in top:
        return None
    tcp = attrs(top[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP)
    if tcp is None:
        return None
    state = attrs(tcp).get(CTA_PROTOINFO_TCP_STATE)
    return state[0] if state is not None and len(state) == 1 else None


def parse_event(kind: str, payload: bytes | memoryview, mark: int = 0) -> CtEvent | None:
    """The CtEvent in one ctnetlink entry message body (after the nlmsghdr).

    With `mark`: None for an entry without any of its bits, read no further
    (the host's own conversations cost one level of parsing, not seven).
    """
    top = _top(payload)
    if mark and not unsigned(top, CTA_MARK, 4) & mark:
        return None
    src, sport, dst, dport, protocol, icmp = _tuple(top, CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG")
    rsrc, rsport, _rdst, rdport, _p, _i = _tuple(top, CTA_TUPLE_REPLY, "CTA_TUPLE_REPLY")
    stamps = attrs(top[CTA_TIMESTAMP]) if CTA_TIMESTAMP in top else {}
    return CtEvent(
        kind=kind, id=unsigned(top, CTA_ID, 4), version=4 if len(src) == 4 else 6, protocol=protocol,
        src=src, src_port=sport, dst=dst, dst_port=dport, reply_src=rsrc, reply_src_port=rsport,
        mark=unsigned(top, CTA_MARK, 4), icmp=icmp,
        sent=_counters(top, CTA_COUNTERS_ORIG), received=_counters(top, CTA_COUNTERS_REPLY),
        start_ns=unsigned(stamps, CTA_TIMESTAMP_START, 8), stop_ns=unsigned(stamps, CTA_TIMESTAMP_STOP, 8),
        event_ns=unsigned(top, CTA_TIMESTAMP_EVENT, 8),
        tcp_state=_tcp_state(top), reply_dst_port=rdport)


def event_kind(msg_type: int) -> str | None:
    """"new" or "destroy" for a ctnetlink entry message, None for anything else."""
    return _KINDS.get(msg_type)


# -- requests -----------------------------------------------------------------

def _check_args(version: int, protocol: int, client: bytes, client_port: int, local: bytes, local_port: int) -> None:
    if version not in _FAMILY:
        raise ValueError(f"IP version must be 4 or 6, not {version!r}")
    size = _FAMILY[version][1]
    if len(client) != size or len(local) != size:
        raise ValueError(f"IPv{version} addresses must be {size} bytes")
    if protocol not in (TCP, UDP):
        raise ValueError(f"protocol must be TCP (6) or UDP (17), not {protocol!r}")
    for port in (client_port, local_port):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port!r}")


def build_get_request(seq: int, version: int, protocol: int, client: bytes, client_port: int,
                      local: bytes, local_port: int, *, delete_id: int | None = None) -> bytes:
    """IPCTNL_MSG_CT_GET for the entry whose REPLY tuple is local -> client;
    with `delete_id`, IPCTNL_MSG_CT_DELETE of that entry if its CTA_ID is that."""
    _check_args(version, protocol, client, client_port, local, local_port)
    family, _, attr_src, attr_dst = _FAMILY[version]
    ip = attr(attr_src, bytes(local)) + attr(attr_dst, bytes(client))
    # Ports are big-endian on the wire (the kernel's policy is NLA_U16, be16 value).
    proto = (attr(CTA_PROTO_NUM, bytes([protocol]))
             + attr(CTA_PROTO_SRC_PORT, struct.pack("!H", local_port))
             + attr(CTA_PROTO_DST_PORT, struct.pack("!H", client_port)))
    tuple_reply = attr(CTA_TUPLE_REPLY, attr(CTA_TUPLE_IP, ip, nested=True) + attr(CTA_TUPLE_PROTO, proto, nested=True),
                       nested=True)
    # nfgen_family selects how the kernel reads CTA_TUPLE_IP (v4 or v6 attributes).
    body = NFGENMSG.pack(family, NFNETLINK_V0, 0) + tuple_reply
    kind = IPCTNL_MSG_CT_GET
    if delete_id is not None:  # the id: never another entry that took the tuple since
        body += attr(CTA_ID, struct.pack("!I", delete_id))
        kind = IPCTNL_MSG_CT_DELETE
    # NLM_F_ACK: success ends with an explicit ack after the entry, so the end
    # of every answer is an NLMSG_ERROR we can wait for; no guessing.
    return message(NFNL_SUBSYS_CTNETLINK << 8 | kind, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def build_dump_request(family: int, mark: int) -> bytes:
    """The body of a CT_GET dump of the entries whose mark has `mark`'s bits (the kernel filters)."""
    return (NFGENMSG.pack(family, NFNETLINK_V0, 0)
            + attr(CTA_MARK, struct.pack("!I", mark)) + attr(CTA_MARK_MASK, struct.pack("!I", mark)))


# -- sockets ------------------------------------------------------------------

class Conntrack:
    """One ctnetlink socket in the caller's network namespace, reused per lookup.

    Lookups are serialised by a lock, so threads may share one instance.
    Needs CAP_NET_ADMIN (nfnetlink refuses everyone else with EPERM).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._buffer = bytearray(RECV_BUFFER)
        self._sock: socket.socket | None = open_socket(NETLINK_NETFILTER, ext_ack=True, timeout=timeout)

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def entry(self, version: int, protocol: int, client: bytes, client_port: int,
              local: bytes, local_port: int) -> Entry | None:
        """The entry whose REPLY tuple is local:local_port -> client:client_port, or None.

        client/client_port: the packet's source as the worker saw it (or the
        port a listener's reply goes to); local: its destination address after
        the redirect; local_port: the port the client asked for (redirect keeps it).
        """
        with self._lock:
            if self._sock is None:
                raise ValueError("Conntrack is closed")
            self._seq = self._seq % 0xFFFFFFFF + 1  # never 0, wraps within u32
            request = build_get_request(self._seq, version, protocol, client, client_port, local, local_port)
            found: Entry | None = None
            try:
                self._sock.send(request)
                for msg_type, payload in answers(self._sock, self._seq, self._buffer):
                    if found is None and msg_type == _ENTRY:
                        found = parse_entry(payload)
            except TimeoutError as exc:
                raise ConntrackError(errno.ETIMEDOUT, "ctnetlink: no answer from the kernel") from exc
            except NetlinkFormatError:
                raise
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                # e.g. ENOBUFS when our receive queue overflowed
                raise ConntrackError(exc.errno, f"ctnetlink CT_GET: {exc.strerror or exc}") from exc
            return found

    def delete(self, version: int, protocol: int, client: bytes, client_port: int,
               local: bytes, local_port: int, entry_id: int) -> bool:
        """Delete the entry whose REPLY tuple is local:local_port -> client:client_port
        if it is still the one with CTA_ID `entry_id`; False if it is gone."""
        with self._lock:
            if self._sock is None:
                raise ValueError("Conntrack is closed")
            self._seq = self._seq % 0xFFFFFFFF + 1
            try:
                self._sock.send(build_get_request(self._seq, version, protocol, client, client_port, local,
                                                  local_port, delete_id=entry_id))
                for _ in answers(self._sock, self._seq, self._buffer):
                    pass
            except TimeoutError as exc:
                raise ConntrackError(errno.ETIMEDOUT, "ctnetlink: no answer from the kernel") from exc
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return False
                raise ConntrackError(exc.errno, f"ctnetlink CT_DELETE: {exc.strerror or exc}") from exc
            return True


class EventSocket:
    """A ctnetlink socket subscribed to NEW and DESTROY events in this namespace.

    `lost` counts the events the kernel dropped because our receive queue was
    full (the socket's drop counter, one per event): those conversations miss
    a start or an end record. `overflows` counts the times it said so (ENOBUFS).
    """

    def __init__(self, buffer: int = SOCKET_BUFFER) -> None:
        self.sock = open_socket(NETLINK_NETFILTER, groups=NF_NETLINK_CONNTRACK_NEW | NF_NETLINK_CONNTRACK_DESTROY,
                                receive_buffer=buffer)
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
        kinds = _KINDS
        return [(kinds[msg_type], payload) for msg_type, _flags, _seq, payload in messages(self._buffer[:size])
                if msg_type in kinds]


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
    found = Dump([])
    with open_socket(NETLINK_NETFILTER, timeout=timeout) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            read_dump(dump(sock, NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET, build_dump_request(family, mark), seq),
                      found)
    return found


def read_dump(answered, found: Dump) -> None:
    """Add a dump's entries (the (type, payload) it answered with) to `found`."""
    for msg_type, payload in answered:
        if msg_type == _ENTRY:  # a dump answers with CT_NEW messages
            try:
                found.live.append(parse_event("live", payload))
            except NetlinkFormatError:
                found.unreadable += 1
