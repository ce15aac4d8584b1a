"""Netlink framing, once: messages (struct nlmsghdr), attributes (struct
nlattr), the kernel's errors and acks, and the sockets that carry them.

Hand-written: the conversation log parses every conntrack event (tens of
thousands a second in a flood) and the capture every packet, so the loops
keep to local names and precompiled structs. Values are from the Linux UAPI
headers (linux/netlink.h, linux/netfilter/nfnetlink.h); the socket module
does not export them all.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Iterator

NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12
SOL_NETLINK = 270  # linux/socket.h
NETLINK_CAP_ACK = 10  # errors do not echo our whole request back
NETLINK_EXT_ACK = 11  # errors may carry a human-readable reason
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: root passes net.core.rmem_max

# struct nlmsghdr, host byte order: len, type, flags, seq, pid.
NLMSGHDR = struct.Struct("=IHHII")
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_CAPPED = 0x100  # on an NLMSG_ERROR: it holds only the header of our request
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ack attributes follow
# struct nlmsgerr: int error (negative errno, 0 for an ack), then our request's nlmsghdr.
NLMSGERR = struct.Struct("=i")
NLMSGERR_ATTR_MSG = 1  # extended ack: NUL-terminated string

# struct nlattr: len (header + payload, without padding), type; host byte order.
NLATTR = struct.Struct("=HH")
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
ALIGNTO = 4  # messages and attributes alike

# struct nfgenmsg: family, version, res_id (big-endian); every nfnetlink body starts with it.
NFGENMSG = struct.Struct("=BBH")
NFNETLINK_V0 = 0

RECV_BUFFER = 1 << 16  # a datagram the kernel builds for a dump or an answer fits


class NetlinkError(OSError):
    """The kernel refused a request, or netlink itself failed (errno as the kernel said)."""


class NetlinkFormatError(NetlinkError):
    """A message did not parse; errno is EPROTO."""

    def __init__(self, reason: str):
        super().__init__(errno.EPROTO, f"malformed netlink message: {reason}")


def align(n: int) -> int:
    return (n + ALIGNTO - 1) & -ALIGNTO


def attr(attr_type: int, payload: bytes, nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes (the padding is not in nla_len)."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, attr_type | (NLA_F_NESTED if nested else 0)) + payload + b"\0" * (-length % ALIGNTO)


_unpack_nlattr, _NLATTR_SIZE = NLATTR.unpack_from, NLATTR.size


def attrs(data: bytes | memoryview, cut_off: bool = False) -> dict[int, memoryview]:
    """Attributes of one level, by type with the flag bits masked off.

    Payloads are views into `data`; a nested attribute is parsed by calling
    this again on its payload. A repeated type keeps its first occurrence.
    `cut_off`: `data` may end inside an attribute (a message longer than the
    receive buffer); the attributes before it are kept.
    """
    view = memoryview(data)
    found: dict[int, memoryview] = {}
    offset, end = 0, len(view)
    # The conversation log parses seven levels per event: the loop is kept lean.
    while offset + _NLATTR_SIZE <= end:
        length, attr_type = _unpack_nlattr(view, offset)
        if length < _NLATTR_SIZE or offset + length > end:
            if cut_off:
                break
            raise NetlinkFormatError(f"attribute length {length} at offset {offset} of {end}")
        key = attr_type & NLA_TYPE_MASK
        if key not in found:
            found[key] = view[offset + _NLATTR_SIZE : offset + length]
        offset += (length + ALIGNTO - 1) & -ALIGNTO
    # Fewer than a header's worth of bytes left over is only padding.
    return found


def message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


_unpack_nlmsghdr, _NLMSGHDR_SIZE = NLMSGHDR.unpack_from, NLMSGHDR.size


def messages(data: bytes | bytearray | memoryview, size: int | None = None) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, payload) of each message in the first `size` bytes
    (default: all) of one datagram; payloads are views into `data`."""
    view = memoryview(data)
    end = len(view) if size is None else size
    offset = 0
    while offset + _NLMSGHDR_SIZE <= end:
        length, msg_type, flags, seq, _pid = _unpack_nlmsghdr(view, offset)
        if length < _NLMSGHDR_SIZE or offset + length > end:
            raise NetlinkFormatError(f"message length {length} at offset {offset} of {end}")
        yield msg_type, flags, seq, view[offset + _NLMSGHDR_SIZE : offset + length]
        offset += (length + ALIGNTO - 1) & -ALIGNTO


def error_of(flags: int, payload: memoryview) -> tuple[int, str]:
    """(errno, extended-ack reason or '') of an NLMSG_ERROR; errno 0 is an ack."""
    if len(payload) < NLMSGERR.size:
        raise NetlinkFormatError("truncated NLMSG_ERROR")
    (error,) = NLMSGERR.unpack_from(payload)
    if not error or not flags & NLM_F_ACK_TLVS or len(payload) < NLMSGERR.size + NLMSGHDR.size:
        return -error, ""
    # After the error code: our request's header, plus its payload unless capped.
    skip = NLMSGHDR.size if flags & NLM_F_CAPPED else NLMSGHDR.unpack_from(payload, NLMSGERR.size)[0]
    try:
        msg = attrs(payload[NLMSGERR.size + align(skip) :]).get(NLMSGERR_ATTR_MSG)
    except NetlinkFormatError:
        return -error, ""
    return -error, bytes(msg).split(b"\0", 1)[0].decode("utf-8", "replace") if msg is not None else ""


def answers(sock: socket.socket, seq: int, buffer: bytearray | None = None) -> Iterator[tuple[int, memoryview]]:
    """(type, payload) of each message answering request `seq`, until its ack
    or NLMSG_DONE. Messages for other sequence numbers (late answers to a
    request that timed out) are dropped. A payload is valid until the next
    item is asked for. The kernel's error raises NetlinkError."""
    buffer = bytearray(RECV_BUFFER) if buffer is None else buffer
    while True:
        size = sock.recv_into(buffer)
        for msg_type, flags, msg_seq, payload in messages(buffer, size):
            if msg_seq != seq or msg_type == NLMSG_NOOP:
                continue
            if msg_type == NLMSG_ERROR:
                code, reason = error_of(flags, payload)
                if code:
                    raise NetlinkError(code, os.strerror(code) + (f": {reason}" if reason else ""))
                return
            if msg_type == NLMSG_DONE:  # the end of a dump; no ack follows one
                return
            if msg_type == NLMSG_OVERRUN:
                raise NetlinkError(errno.ENOBUFS, "netlink overrun, answer lost")
            yield msg_type, payload


def dump(sock: socket.socket, msg_type: int, body: bytes, seq: int = 1) -> Iterator[tuple[int, memoryview]]:
    """Send one dump request; (type, payload) of each entry it answers with."""
    sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
    return answers(sock, seq)


def request(sock: socket.socket, msg_type: int, body: bytes, seq: int = 1) -> None:
    """Send one request and wait for its ack (NetlinkError if the kernel refuses it)."""
    sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, body))
    for _ in answers(sock, seq):
        pass


def open_socket(protocol: int, *, groups: int = 0, receive_buffer: int = 0, ext_ack: bool = False,
                timeout: float | None = None) -> socket.socket:
    """A netlink socket of `protocol` in the caller's network namespace, bound
    (the kernel picks the port id) to the multicast `groups`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        if receive_buffer:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        for option in (NETLINK_CAP_ACK, NETLINK_EXT_ACK) if ext_ack else ():
            try:
                sock.setsockopt(SOL_NETLINK, option, 1)
            except OSError:
                pass  # older kernels: plainer error messages, nothing worse
        sock.bind((0, groups))
        if timeout is not None:
            sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock
