"""Parse just enough of an IPv4/IPv6 TCP/UDP packet to divert it.

IPv4 options and IPv6 hop-by-hop, routing (with no segments left) and
destination options headers are stepped over: a port rewrite leaves them,
and the pseudo-header the checksum covers, as they were. Anything we are not
certain to rewrite correctly is Unfit and must pass unchanged: fragments,
AH and other extension headers, a routing header still under way and, above
all, the truncated copies NetfilterQueue hands over for packets beyond its
copy range. (Conntrack reassembles fragments before our hooks, so a fragment
reaching us is rare and is not ours to rewrite.)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal, NamedTuple

from nftdivert.netlink.ipproto import TCP, UDP

FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

UnfitReason = Literal[
    "short-header",
    "bad-version",
    "truncated",
    "length-mismatch",
    "fragment",
    "ipv6-extension-header",
    "unknown-protocol",
]


@dataclass(frozen=True, slots=True)
class Unfit:
    reason: UnfitReason


class Segment(NamedTuple):
    """Immutable like a frozen dataclass, but made in a third of the time:
    one is made for every queued packet."""

    version: int  # 4 or 6
    protocol: int  # TCP or UDP
    src: bytes  # 4 or 16 bytes, network order
    dst: bytes
    sport: int
    dport: int
    l4_offset: int  # first byte of the TCP/UDP header
    tcp_flags: int  # 0 for UDP
    checksum: int  # L4 checksum field as found

    @property
    def is_syn(self) -> bool:
        """A connection opener: SYN without ACK (a SYN-ACK is a reply)."""
        return self.tcp_flags & (SYN | ACK) == SYN

    @property
    def starts_conversation(self) -> bool:
        """Only a TCP opener or any UDP datagram may create a mapping."""
        return self.protocol == UDP or self.is_syn


# Segment(...) without its Python-level __new__: one call less per packet.
_segment = tuple.__new__

# One instance per reason: the reject path allocates nothing.
SHORT_HEADER = Unfit("short-header")
BAD_VERSION = Unfit("bad-version")
TRUNCATED = Unfit("truncated")
LENGTH_MISMATCH = Unfit("length-mismatch")
FRAGMENT = Unfit("fragment")
IPV6_EXTENSION_HEADER = Unfit("ipv6-extension-header")
UNKNOWN_PROTOCOL = Unfit("unknown-protocol")

# version/IHL, total length, flags/fragment offset, protocol, src, dst
_IPV4 = struct.Struct("!B1xH2xH1xB2x4s4s")
# payload length, next header, src, dst
_IPV6 = struct.Struct("!4xHB1x16s16s")
# ports, data offset byte, flags byte, checksum
_TCP = struct.Struct("!HH8xBB2xH")
# ports, length, checksum
_UDP = struct.Struct("!HHHH")

_IPV4_MF_AND_OFFSET = 0x3FFF  # DF alone is fine
_IPV6_FRAGMENT = 44
_IPV6_ROUTING = 43
# Extension headers of the common form (next header, length in 8 octets
# beyond the first 8) that a port rewrite may step over.
_IPV6_WALKED = frozenset({0, _IPV6_ROUTING, 60})
# The others: AH authenticates the ports; the rest are not for TCP/UDP.
_IPV6_EXTENSIONS = frozenset({51, 135, 139, 140, 253, 254})
# Headers reaching beyond this offset: not a packet we rewrite (and a
# hostile chain of tiny headers costs a bounded walk).
_IPV6_WALK_LIMIT = 40 + 512


def parse_head(data: bytes) -> Segment | Unfit:
    """The headers of a copy that parse() called TRUNCATED (the queue copies
    only the first 4016 bytes): enough to tell whose packet it is, never
    enough to rewrite it, since its checksum covers bytes we do not have."""
    return parse(data, False)


def parse(data: bytes, whole: bool = True) -> Segment | Unfit:
    """Return a Segment only for a complete, plain TCP/UDP packet (`whole`;
    see parse_head() for the other case). Never raises."""
    size = len(data)
    if size < 1:
        return SHORT_HEADER
    version = data[0] >> 4
    if version == 4:
        if size < 20:
            return SHORT_HEADER
        vihl, total, frag, protocol, src, dst = _IPV4.unpack_from(data)
        ihl = vihl & 0x0F
        if ihl < 5:
            return SHORT_HEADER
        if total > size and whole:
            return TRUNCATED
        if total < size:
            return LENGTH_MISMATCH
        if ihl * 4 > size:
            return SHORT_HEADER
        if frag & _IPV4_MF_AND_OFFSET:
            return FRAGMENT
        l4 = ihl * 4
    elif version == 6:
        if size < 40:
            return SHORT_HEADER
        payload, protocol, src, dst = _IPV6.unpack_from(data)
        if 40 + payload > size and whole:
            return TRUNCATED
        if 40 + payload < size:
            return LENGTH_MISMATCH
        l4 = 40
        while protocol in _IPV6_WALKED:
            if l4 + 8 > size or l4 >= _IPV6_WALK_LIMIT:
                return SHORT_HEADER if l4 + 8 > size else IPV6_EXTENSION_HEADER
            if protocol == _IPV6_ROUTING and data[l4 + 3]:
                return IPV6_EXTENSION_HEADER  # segments left: the destination is not final yet
            protocol, l4 = data[l4], l4 + (data[l4 + 1] + 1) * 8
        if protocol == _IPV6_FRAGMENT:
            return FRAGMENT
        if protocol in _IPV6_EXTENSIONS:
            return IPV6_EXTENSION_HEADER
    else:
        return BAD_VERSION

    l4_size = size - l4
    if protocol == TCP:
        if l4_size < 20:
            return SHORT_HEADER
        sport, dport, offset, flags, checksum = _TCP.unpack_from(data, l4)
        header = (offset >> 4) * 4
        if header < 20 or header > l4_size:
            return SHORT_HEADER
        return _segment(Segment, (version, TCP, src, dst, sport, dport, l4, flags, checksum))
    if protocol == UDP:
        if l4_size < 8:
            return SHORT_HEADER
        sport, dport, length, checksum = _UDP.unpack_from(data, l4)
        if length != l4_size and (whole or length < l4_size):
            return LENGTH_MISMATCH
        return _segment(Segment, (version, UDP, src, dst, sport, dport, l4, 0, checksum))
    return UNKNOWN_PROTOCOL
