"""Ask the kernel's conntrack table where a redirected connection was going.

After an nftables `redirect` at prerouting the worker only ever sees the
diverter's own address as destination; the address the client asked for lives
on in the conntrack entry's ORIGINAL tuple. This module fetches one entry over
ctnetlink (a NETLINK_NETFILTER socket, the protocol `conntrack -G` speaks),
in pure Python: no libnetfilter_conntrack, no pyroute2.

The worker knows the packet as the kernel delivered it, after NAT:
client:client_port -> local:port. That is exactly the entry's REPLY tuple
turned around (local:port -> client:client_port), and the kernel finds an
entry by either of its tuples, so one CT_GET with CTA_TUPLE_REPLY suffices.
The same GET also finds a conversation whose client port the kernel itself
remapped (its reply tuple then names the new port), so the worker asks it
for replies it cannot place; see `Conntrack.entry`.

Entries are only in the table once confirmed, i.e. after the first packet has
passed the last netfilter hook. The queue callback runs before that; the
worker asks only at a listener's reply, by which time the entry is there.
The conversation log does not look up at all: it reads conntrack's events
(ctevents.py, built on the helpers here).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import NamedTuple

# Not all exported by the socket module; values are from the Linux UAPI headers.
NETLINK_NETFILTER = 12  # linux/netlink.h
SOL_NETLINK = 270  # linux/socket.h
NETLINK_CAP_ACK = 10  # errors do not echo our whole request back
NETLINK_EXT_ACK = 11  # errors may carry a human-readable reason

# struct nlmsghdr (linux/netlink.h), host byte order: len, type, flags, seq, pid.
NLMSGHDR = struct.Struct("=IHHII")
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ACK_TLVS = 0x200  # set on an NLMSG_ERROR that carries extended-ack attributes
NLM_F_CAPPED = 0x100  # the NLMSG_ERROR holds only the header of our request

# struct nlmsgerr: int error (negative errno, 0 for an ack), then our request's nlmsghdr.
NLMSGERR = struct.Struct("=i")
NLMSGERR_ATTR_MSG = 1  # extended ack: NUL-terminated string

# struct nlattr: len (header + payload, without padding), type; host byte order.
NLATTR = struct.Struct("=HH")
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NLA_ALIGNTO = 4
NLMSG_ALIGNTO = 4

# struct nfgenmsg (linux/netfilter/nfnetlink.h): family, version, res_id (big-endian).
NFGENMSG = struct.Struct("=BBH")
NFNETLINK_V0 = 0
NFNL_SUBSYS_CTNETLINK = 1

# linux/netfilter/nfnetlink_conntrack.h
IPCTNL_MSG_CT_NEW = 0  # event/dump messages describing an entry
IPCTNL_MSG_CT_GET = 1
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_MARK = 8
CTA_ID = 12
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
IPS_SEEN_REPLY = 1 << 1  # linux/netfilter/nf_conntrack_common.h

TCP = 6
UDP = 17

# One conntrack entry is well under a page; the kernel builds the reply with
# NLMSG_DEFAULT_SIZE. 64 KiB leaves room for anything a datagram can hold.
RECV_BUFFER = 65536
DEFAULT_TIMEOUT = 1.0  # seconds; the kernel answers at once or never

_FAMILY = {4: (socket.AF_INET, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST), 6: (socket.AF_INET6, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST)}


class Entry(NamedTuple):
    """What one conntrack entry says: its ORIGINAL tuple, the client's side of
    the conversation before any NAT, and two facts about the entry itself."""

    src: bytes  # the client
    src_port: int  # the client's own port (the kernel may have remapped it since)
    dst: bytes  # the destination the client asked for
    dst_port: int
    id: int  # CTA_ID, 0 when the kernel sent none
    seen_reply: bool  # a reply has already passed conntrack (IPS_SEEN_REPLY)
    mark: int = 0  # the entry's ct mark


class ConntrackError(OSError):
    """ctnetlink failed for a reason other than "no such entry"."""


class NetlinkFormatError(ConntrackError):
    """The kernel's answer did not parse; errno is EPROTO."""

    def __init__(self, reason: str):
        super().__init__(errno.EPROTO, f"malformed ctnetlink message: {reason}")


def _align(n: int, to: int = NLA_ALIGNTO) -> int:
    return (n + to - 1) & ~(to - 1)


def nla(attr_type: int, payload: bytes, nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes (the padding is not in nla_len)."""
    length = NLATTR.size + len(payload)
    header = NLATTR.pack(length, attr_type | (NLA_F_NESTED if nested else 0))
    return header + payload + b"\0" * (_align(length) - length)


_unpack_nlattr, _NLATTR_SIZE = NLATTR.unpack_from, NLATTR.size


def parse_attrs(data: bytes | memoryview) -> dict[int, memoryview]:
    """Attributes of one level, by type with the flag bits masked off.

    Payloads are views into `data`; nested attributes are parsed by calling
    this again on the payload. A repeated type keeps its first occurrence.
    """
    view = memoryview(data)
    attrs: dict[int, memoryview] = {}
    offset, end = 0, len(view)
    # The conversation log parses seven levels per event: the loop is kept lean.
    while offset + _NLATTR_SIZE <= end:
        length, attr_type = _unpack_nlattr(view, offset)
        if length < _NLATTR_SIZE or offset + length > end:
            raise NetlinkFormatError(f"attribute length {length} at offset {offset} of {end}")
        key = attr_type & NLA_TYPE_MASK
        if key not in attrs:
            attrs[key] = view[offset + _NLATTR_SIZE : offset + length]
        offset += (length + NLA_ALIGNTO - 1) & -NLA_ALIGNTO
    # Fewer than a header's worth of bytes left over is only padding.
    return attrs


def _nested(attrs: dict[int, memoryview], attr_type: int, name: str) -> dict[int, memoryview]:
    if attr_type not in attrs:
        raise NetlinkFormatError(f"{name} missing")
    return parse_attrs(attrs[attr_type])


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
                      local: bytes, local_port: int) -> bytes:
    """IPCTNL_MSG_CT_GET for the entry whose REPLY tuple is local -> client."""
    _check_args(version, protocol, client, client_port, local, local_port)
    family, _, attr_src, attr_dst = _FAMILY[version]
    ip = nla(attr_src, bytes(local)) + nla(attr_dst, bytes(client))
    # Ports are big-endian on the wire (the kernel's policy is NLA_U16, be16 value).
    proto = (nla(CTA_PROTO_NUM, bytes([protocol]))
             + nla(CTA_PROTO_SRC_PORT, struct.pack("!H", local_port))
             + nla(CTA_PROTO_DST_PORT, struct.pack("!H", client_port)))
    tuple_reply = nla(CTA_TUPLE_REPLY, nla(CTA_TUPLE_IP, ip, nested=True) + nla(CTA_TUPLE_PROTO, proto, nested=True),
                      nested=True)
    # nfgen_family selects how the kernel reads CTA_TUPLE_IP (v4 or v6 attributes).
    body = NFGENMSG.pack(family, NFNETLINK_V0, 0) + tuple_reply
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    # NLM_F_ACK: success ends with an explicit ack after the entry, so the end
    # of every answer is an NLMSG_ERROR we can wait for; no guessing.
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def unsigned(attrs: dict[int, memoryview], attr_type: int, size: int) -> int:
    """A big-endian unsigned attribute of `size` bytes; 0 when absent."""
    value = attrs.get(attr_type)
    if value is None:
        return 0
    if len(value) != size:
        raise NetlinkFormatError(f"attribute {attr_type} of {len(value)} bytes, not {size}")
    return int.from_bytes(value, "big")


def _u32(attrs: dict[int, memoryview], attr_type: int) -> int:
    return unsigned(attrs, attr_type, 4)


def _endpoint(ip: dict[int, memoryview], proto: dict[int, memoryview], which: str) -> tuple[bytes, int]:
    v4, v6, port_type = ((CTA_IP_V4_SRC, CTA_IP_V6_SRC, CTA_PROTO_SRC_PORT) if which == "source"
                         else (CTA_IP_V4_DST, CTA_IP_V6_DST, CTA_PROTO_DST_PORT))
    if v4 in ip:
        address, size = bytes(ip[v4]), 4
    elif v6 in ip:
        address, size = bytes(ip[v6]), 16
    else:
        raise NetlinkFormatError(f"no {which} address in CTA_TUPLE_IP")
    if len(address) != size:
        raise NetlinkFormatError(f"{which} address of {len(address)} bytes")
    port_attr = proto.get(port_type)
    if port_attr is None or len(port_attr) != 2:
        raise NetlinkFormatError(f"{which} port missing or not 2 bytes")
    return address, struct.unpack("!H", port_attr)[0]


def parse_entry(payload: bytes | memoryview) -> Entry:
    """The Entry in a ctnetlink entry message body (after the nlmsghdr)."""
    view = memoryview(payload)
    if len(view) < NFGENMSG.size:
        raise NetlinkFormatError("message shorter than nfgenmsg")
    top = parse_attrs(view[NFGENMSG.size :])
    orig = _nested(top, CTA_TUPLE_ORIG, "CTA_TUPLE_ORIG")
    ip = _nested(orig, CTA_TUPLE_IP, "CTA_TUPLE_IP")
    proto = _nested(orig, CTA_TUPLE_PROTO, "CTA_TUPLE_PROTO")
    src, src_port = _endpoint(ip, proto, "source")
    dst, dst_port = _endpoint(ip, proto, "destination")
    return Entry(src, src_port, dst, dst_port, _u32(top, CTA_ID), bool(_u32(top, CTA_STATUS) & IPS_SEEN_REPLY),
                 _u32(top, CTA_MARK))


def _error_reason(flags: int, data: memoryview) -> str:
    """The extended-ack message of an NLMSG_ERROR payload, or ''."""
    if not flags & NLM_F_ACK_TLVS or len(data) < NLMSGERR.size + NLMSGHDR.size:
        return ""
    # After the error code: our request's header, plus its payload unless capped.
    skip = NLMSGHDR.size
    if not flags & NLM_F_CAPPED:
        skip = NLMSGHDR.unpack_from(data, NLMSGERR.size)[0]
    try:
        attrs = parse_attrs(data[NLMSGERR.size + _align(skip, NLMSG_ALIGNTO) :])
    except NetlinkFormatError:
        return ""
    msg = attrs.get(NLMSGERR_ATTR_MSG)
    return bytes(msg).split(b"\0", 1)[0].decode("utf-8", "replace") if msg is not None else ""


class Conntrack:
    """One ctnetlink socket in the caller's network namespace, reused per lookup.

    Lookups are serialised by a lock, so threads may share one instance.
    Needs CAP_NET_ADMIN (nfnetlink refuses everyone else with EPERM).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._buffer = bytearray(RECV_BUFFER)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
                try:
                    sock.setsockopt(SOL_NETLINK, option, 1)
                except OSError:
                    pass  # older kernels: plainer error messages, nothing worse
            sock.bind((0, 0))  # the kernel picks our port id; no multicast groups
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        self._sock: socket.socket | None = sock

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
            seq = self._seq
            request = build_get_request(seq, version, protocol, client, client_port, local, local_port)
            try:
                self._sock.send(request)
                return self._receive(seq)
            except TimeoutError as exc:
                raise ConntrackError(errno.ETIMEDOUT, "ctnetlink: no answer from the kernel") from exc
            except ConntrackError:
                raise
            except OSError as exc:
                # e.g. ENOBUFS when our receive queue overflowed
                raise ConntrackError(exc.errno, f"ctnetlink: {exc.strerror or exc}") from exc

    def original_destination(self, version: int, protocol: int, client: bytes, client_port: int,
                             local: bytes, local_port: int) -> tuple[bytes, int] | None:
        """(address, port) the client originally sent to, or None if conntrack has no such entry."""
        found = self.entry(version, protocol, client, client_port, local, local_port)
        return None if found is None else (found.dst, found.dst_port)

    def _receive(self, seq: int) -> Entry | None:
        """Read until the NLMSG_ERROR/ack for `seq`; messages for other sequence numbers
        (late answers to a request that timed out) are dropped."""
        assert self._sock is not None
        found: Entry | None = None
        while True:
            size = self._sock.recv_into(self._buffer)
            view = memoryview(self._buffer)[:size]
            offset = 0
            while offset + NLMSGHDR.size <= size:
                length, msg_type, flags, msg_seq, _pid = NLMSGHDR.unpack_from(view, offset)
                if length < NLMSGHDR.size or offset + length > size:
                    raise NetlinkFormatError(f"message length {length} at offset {offset} of {size}")
                payload = view[offset + NLMSGHDR.size : offset + length]
                offset += _align(length, NLMSG_ALIGNTO)
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_ERROR:
                    if len(payload) < NLMSGERR.size:
                        raise NetlinkFormatError("truncated NLMSG_ERROR")
                    (error,) = NLMSGERR.unpack_from(payload)
                    if error == 0:  # the ack: the answer is complete
                        return found
                    if -error == errno.ENOENT:
                        return None
                    reason = _error_reason(flags, payload)
                    text = os.strerror(-error) + (f": {reason}" if reason else "")
                    raise ConntrackError(-error, f"ctnetlink CT_GET: {text}")
                if msg_type == NLMSG_DONE:  # end of a multi-part answer; no ack follows a dump
                    return found
                if msg_type == NLMSG_OVERRUN:
                    raise ConntrackError(errno.ENOBUFS, "ctnetlink: netlink overrun, answer lost")
                if msg_type == NLMSG_NOOP:
                    continue
                if msg_type >> 8 != NFNL_SUBSYS_CTNETLINK:
                    continue
                if found is None:
                    found = parse_entry(payload)
