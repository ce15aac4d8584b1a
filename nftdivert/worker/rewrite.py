"""Rewrite one TCP/UDP port of a parsed packet, fixing its checksum in place."""
from __future__ import annotations

import struct

from nftdivert.worker.checksum import adjust, l4_checksum
from nftdivert.worker.packet import UDP, Segment

_U16 = struct.Struct("!H")


def with_dport(data: bytes, seg: Segment, port: int) -> bytes:
    """The packet with its destination port set to `port`."""
    return with_ports(data, seg, seg.sport, port)


def with_sport(data: bytes, seg: Segment, port: int) -> bytes:
    """The packet with its source port set to `port`."""
    return with_ports(data, seg, port, seg.dport)


def with_ports(data: bytes, seg: Segment, sport: int, dport: int) -> bytes:
    """The packet with both ports set; the two share one header word pair and one checksum fix."""
    out = bytearray(data)
    at = seg.l4_offset
    _U16.pack_into(out, at, sport)
    _U16.pack_into(out, at + 2, dport)
    checksum = seg.checksum
    if seg.protocol == UDP and checksum == 0:
        if seg.version == 6:
            # Invalid on the wire (RFC 8200) unless a tunnel socket opted
            # out (RFC 6936); a full, valid checksum satisfies both.
            checksum = l4_checksum(6, seg.src, seg.dst, UDP, out[at:])
        # else IPv4 "no checksum": stays 0.
    else:
        if sport != seg.sport:
            checksum = adjust(checksum, seg.sport, sport)
        if dport != seg.dport:
            checksum = adjust(checksum, seg.dport, dport)
        if seg.protocol == UDP and checksum == 0:
            checksum = 0xFFFF  # 0 means "none" for UDP; its ones' complement twin is the same sum
    _U16.pack_into(out, seg.checksum_offset, checksum)
    return bytes(out)
