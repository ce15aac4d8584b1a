"""Rewrite one TCP/UDP port of a parsed packet, fixing its checksum in place."""
from __future__ import annotations

import struct

from nftdivert.checksum import adjust, l4_checksum
from nftdivert.packet import UDP, Segment

_U16 = struct.Struct("!H")


def with_dport(data: bytes, seg: Segment, port: int) -> bytes:
    """The packet with its destination port set to `port`."""
    return _with_port(data, seg, seg.l4_offset + 2, seg.dport, port)


def with_sport(data: bytes, seg: Segment, port: int) -> bytes:
    """The packet with its source port set to `port`."""
    return _with_port(data, seg, seg.l4_offset, seg.sport, port)


def _with_port(data: bytes, seg: Segment, at: int, old: int, new: int) -> bytes:
    out = bytearray(data)
    _U16.pack_into(out, at, new)
    checksum = seg.checksum
    if seg.protocol == UDP:
        if checksum == 0:
            if seg.version == 6:
                # Invalid on the wire (RFC 8200) unless a tunnel socket opted
                # out (RFC 6936); a full, valid checksum satisfies both.
                checksum = l4_checksum(6, seg.src, seg.dst, UDP, out[seg.l4_offset :])
            # else IPv4 "no checksum": stays 0.
        else:
            checksum = adjust(checksum, old, new) or 0xFFFF
    else:
        checksum = adjust(checksum, old, new)
    _U16.pack_into(out, seg.checksum_offset, checksum)
    return bytes(out)
