"""Rewrite the TCP/UDP ports of a parsed packet, fixing its checksum incrementally."""
from __future__ import annotations

import struct

from nftdivert.worker.checksum import l4_checksum
from nftdivert.worker.packet import TCP, UDP, Segment

_U16 = struct.Struct("!H")
_PORTS = struct.Struct("!HH")


def with_ports(data: bytes, seg: Segment, sport: int, dport: int) -> bytes:
    """The packet with both ports set; the two share one header word pair and one checksum fix.

    The fix is RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), for both words in one
    sum: ones' complement addition is associative and a fold of a non-zero
    sum is never 0, so one fold of both gives what two updates give. Unlike
    RFC 1141's HC + m + ~m', it never turns a checksum into the negative zero
    a full recomputation would not produce. Written out here, not called,
    because every queued packet comes this way."""
    version, protocol, src, dst, old_sport, old_dport, at, _flags, checksum = seg
    out = bytearray(data)
    _PORTS.pack_into(out, at, sport, dport)
    if protocol == UDP and checksum == 0:
        if version == 6:
            # Invalid on the wire (RFC 8200) unless a tunnel socket opted
            # out (RFC 6936); a full, valid checksum satisfies both.
            checksum = l4_checksum(6, src, dst, UDP, out[at:])
        # else IPv4 "no checksum": stays 0.
    else:
        total = ~checksum & 0xFFFF
        if sport != old_sport:
            total += (~old_sport & 0xFFFF) + sport
        if dport != old_dport:
            total += (~old_dport & 0xFFFF) + dport
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        checksum = ~total & 0xFFFF
        if checksum == 0 and protocol == UDP:
            checksum = 0xFFFF  # 0 means "none" for UDP; its ones' complement twin is the same sum
    _U16.pack_into(out, at + 16 if protocol == TCP else at + 6, checksum)
    return bytes(out)
