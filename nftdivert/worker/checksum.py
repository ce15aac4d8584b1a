"""Internet checksum (RFC 1071), computed from scratch.

The kernel does not repair L4 checksums of a payload we hand back, so every
port rewrite (rewrite.py updates the checksum incrementally, RFC 1624) must
leave a checksum identical to this full recomputation.
"""
from __future__ import annotations

import struct

from nftdivert.netlink.ipproto import TCP, UDP

_V4_PSEUDO = struct.Struct("!4s4sxBH")
_V6_PSEUDO = struct.Struct("!16s16sI3xB")


def _fold(total: int) -> int:
    # Loop: one fold of a large sum can itself carry out again.
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum(data: bytes) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def internet_checksum(data: bytes) -> int:
    """One's complement of the one's complement sum of 16-bit words."""
    return ~_fold(_sum(data)) & 0xFFFF


def l4_checksum(version: int, src: bytes, dst: bytes, protocol: int, l4_bytes: bytes) -> int:
    """The value the TCP/UDP checksum field must hold, from scratch.

    The current content of the checksum field in l4_bytes is ignored. A UDP
    result of 0 is returned as 0xFFFF: 0 on the wire means "no checksum"
    (IPv4) or is invalid (IPv6). Reference implementation, not for the hot path.
    """
    field = 16 if protocol == TCP else 6
    segment = bytearray(l4_bytes)
    segment[field : field + 2] = b"\0\0"
    if version == 4:
        pseudo = _V4_PSEUDO.pack(src, dst, protocol, len(segment))
    else:
        pseudo = _V6_PSEUDO.pack(src, dst, len(segment), protocol)
    result = internet_checksum(pseudo + segment)
    if protocol == UDP and result == 0:
        return 0xFFFF
    return result
