"""nfnetlink_log: the socket that reads one nflog group, and its messages.

The table's capture chains `log group N`; the kernel copies each packet into
a netlink message for whoever bound group N in this network namespace (one
reader per group: a second bind is refused with EPERM, so two captures
never mix). Messages are batched: the kernel sends a batch when it holds
QUEUE_THRESHOLD packets or FLUSH_TIMEOUT has passed since the first, so a
busy capture costs one wake-up per batch, not per packet.

The kernel stamps the time only on packets it received (prerouting and
input); for packets it sends, batch() gives None and the caller decides.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import NamedTuple

from nftdivert.netlink.codec import (
    NETLINK_NETFILTER, NFGENMSG, NLATTR, NLA_TYPE_MASK, NetlinkFormatError, attr, messages, open_socket, request)

# linux/netfilter/nfnetlink_log.h
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = NFNL_SUBSYS_ULOG << 8
NFULNL_MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | 1
NFULA_TIMESTAMP = 3  # struct nfulnl_msg_packet_timestamp: be64 seconds, be64 microseconds
NFULA_PAYLOAD = 9
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2  # struct nfulnl_msg_config_mode: be32 copy_range, u8 copy_mode, u8 pad
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4  # in hundredths of a second
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
TIMESTAMP = struct.Struct(">QQ")

COPY_RANGE = 0xFFFF  # the whole packet (the kernel's limit)
QUEUE_THRESHOLD = 64  # packets per batch, at most
FLUSH_TIMEOUT = 1  # hundredths of a second: a batch waits at most 10 ms
NETLINK_BUFFER = 16384  # the kernel's batch buffer: 64 small packets; allocated per batch, so not larger
MESSAGE_MAX = 1 << 17  # a receive: a batch, or one packet of up to 64 KiB (GSO) with its attributes
RECEIVE_BUFFER = 8 << 20  # SO_RCVBUF: bursts wait here while the reader is busy


class Packet(NamedTuple):
    data: memoryview  # the IP packet, in the receive buffer: valid until the next receive
    time: float | None  # seconds since the epoch, when the kernel received it; None for packets it sent


def open_group(group: int, copy_range: int = COPY_RANGE) -> socket.socket:
    """A socket bound to nflog `group` in this network namespace, batching as above,
    with the first `copy_range` bytes of each packet.

    Raises OSError: EPERM when another socket already reads the group."""
    sock = open_socket(NETLINK_NETFILTER, receive_buffer=RECEIVE_BUFFER)
    try:
        _configure(sock, group, [attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND, 0, 0, 0]))])
        _configure(sock, group, [
            attr(NFULA_CFG_MODE, struct.pack(">IBx", copy_range, NFULNL_COPY_PACKET)),
            attr(NFULA_CFG_NLBUFSIZ, struct.pack(">I", NETLINK_BUFFER)),
            attr(NFULA_CFG_TIMEOUT, struct.pack(">I", FLUSH_TIMEOUT)),
            attr(NFULA_CFG_QTHRESH, struct.pack(">I", QUEUE_THRESHOLD)),
        ])
    except BaseException:
        sock.close()
        raise
    return sock


def _configure(sock: socket.socket, group: int, attrs: list[bytes]) -> None:
    request(sock, NFULNL_MSG_CONFIG, NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + b"".join(attrs))


def batch(buf: bytes | bytearray | memoryview, size: int) -> list[Packet]:
    """The packets in one receive of `size` bytes (pure: no socket, no clock)."""
    out: list[Packet] = []
    try:
        for kind, _flags, _seq, payload in messages(buf, size):
            if kind == NFULNL_MSG_PACKET:
                packet = _packet(payload, NFGENMSG.size, len(payload))
                if packet is not None:
                    out.append(packet)
    except NetlinkFormatError:
        pass  # malformed or cut short: the rest of this receive is lost
    return out


def _packet(view: memoryview, at: int, end: int, _attr=NLATTR.unpack_from) -> Packet | None:
    # Per packet, so local names only: this loop is most of the reader's time.
    data, stamp = None, None
    while at + 4 <= end:
        length, kind = _attr(view, at)
        if length < 4 or at + length > end:
            break
        kind &= NLA_TYPE_MASK
        if kind == NFULA_PAYLOAD:
            data = view[at + 4:at + length]
        elif kind == NFULA_TIMESTAMP and length >= 4 + TIMESTAMP.size:
            seconds, micros = TIMESTAMP.unpack_from(view, at + 4)
            stamp = seconds + micros / 1e6
        at += (length + 3) & ~3
    return None if data is None else Packet(data, stamp)


def timed(packets: list[Packet], received: float, floor: float) -> list[tuple[memoryview, float]]:
    """Every packet with a time, in the kernel's order, never earlier than `floor` or the one before.

    A packet the kernel sent has no time of its own: it gets the time this
    batch was received, or the earliest time of a packet received after it
    in the batch, if that is earlier: it was sent before those, and before
    the batch arrived."""
    times: list[float] = []
    later = received
    for packet in reversed(packets):
        later = min(later, packet.time) if packet.time is not None else later
        times.append(packet.time if packet.time is not None else later)
    times.reverse()
    out = []
    for packet, stamp in zip(packets, times):
        floor = max(floor, stamp)
        out.append((packet.data, floor))
    return out


def is_overrun(exc: OSError) -> bool:
    """The socket was full and the kernel dropped messages (reported once, then reading goes on)."""
    return exc.errno == errno.ENOBUFS
