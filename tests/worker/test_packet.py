"""parse(): what is fit for rewriting, and why the rest is not."""
from __future__ import annotations

import struct
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builders import (
    AH,
    DEST_OPTS,
    FRAGMENT_HEADER,
    HOP_BY_HOP,
    PADN6,
    ROUTING,
    V4_CLIENT,
    V4_LOCAL,
    V6_CLIENT,
    V6_LOCAL,
    checksum_offset,
    extension_headers,
    ipv4,
    ipv6,
    packet,
    tcp_segment,
    udp_datagram,
)
from nftdivert.worker.packet import ACK, FIN, RST, SYN, TCP, UDP, Segment, Unfit, UnfitReason, parse, parse_head

TCP4 = packet(4, TCP, V4_CLIENT, V4_LOCAL, 40000, 80, b"GET / HTTP/1.0\r\n\r\n", flags=ACK)
UDP6 = packet(6, UDP, V6_CLIENT, V6_LOCAL, 5353, 53, b"query")


def v4(l4, protocol=TCP, **kw):
    return ipv4(V4_CLIENT, V4_LOCAL, protocol, l4, **kw)


def v6(l4, next_header=TCP, **kw):
    return ipv6(V6_CLIENT, V6_LOCAL, next_header, l4, **kw)


SYN_SEGMENT = tcp_segment(1, 2, SYN)


def v6_ext(chain, l4=SYN_SEGMENT, protocol=TCP):
    first, headers = extension_headers(chain, protocol)
    return v6(headers + l4, next_header=first)


# A routing header (type 4, segment routing) whose segments left is 0 or 1.
ROUTING_DONE = bytes([4, 0]) + bytes(4)
ROUTING_UNDER_WAY = bytes([4, 1]) + bytes(4)

UNFIT = [
    ("empty", b"", "short-header"),
    ("v4 shorter than its header", TCP4[:19], "short-header"),
    ("v6 shorter than its header", UDP6[:39], "short-header"),
    ("version 0", b"\x05" + TCP4[1:], "bad-version"),
    ("version 5", b"\x55" + TCP4[1:], "bad-version"),
    ("IHL below 5", b"\x44" + TCP4[1:], "short-header"),
    ("IPv4 options past the packet", v4(SYN_SEGMENT[:0], options=bytes(4), ihl=15), "short-header"),
    ("v4 copy cut short", TCP4[:-1], "truncated"),
    ("v4 NFQUEUE 4016-byte copy", v4(tcp_segment(1, 2, ACK, bytes(5000)))[:4016], "truncated"),
    ("v6 copy cut short", UDP6[:-1], "truncated"),
    ("v4 trailing byte", TCP4 + b"\0", "length-mismatch"),
    ("v4 total length below header", v4(SYN_SEGMENT, total=10), "length-mismatch"),
    ("v6 trailing byte", UDP6 + b"\0", "length-mismatch"),
    ("v4 more fragments", v4(SYN_SEGMENT, frag=0x2000), "fragment"),
    ("v4 non-first fragment", v4(SYN_SEGMENT, frag=0x0001), "fragment"),
    ("v4 last fragment with DF", v4(SYN_SEGMENT, frag=0x4010), "fragment"),
    ("v6 fragment header", v6(bytes(8) + SYN_SEGMENT, next_header=44), "fragment"),
    ("v6 fragment after hop-by-hop", v6_ext([(HOP_BY_HOP, PADN6), (FRAGMENT_HEADER, bytes(6))]), "fragment"),
    ("v6 routing header under way", v6_ext([(ROUTING, ROUTING_UNDER_WAY)]), "ipv6-extension-header"),
    ("v6 AH", v6_ext([(DEST_OPTS, PADN6), (AH, bytes(14))]), "ipv6-extension-header"),
    ("v6 mobility header", v6(bytes(8), next_header=135), "ipv6-extension-header"),
    ("v6 headers beyond 512 bytes", v6_ext([(DEST_OPTS, PADN6)] * 70), "ipv6-extension-header"),
    ("v6 extension header cut", v6(bytes([TCP, 0, 1, 4]), next_header=HOP_BY_HOP), "short-header"),
    ("v6 extension header longer than the packet", v6(bytes([TCP, 9]) + PADN6, next_header=HOP_BY_HOP),
     "short-header"),
    ("v4 ICMP", v4(bytes(8), protocol=1), "unknown-protocol"),
    ("v6 ICMPv6", v6(bytes(8), next_header=58), "unknown-protocol"),
    ("v4 SCTP", v4(bytes(12), protocol=132), "unknown-protocol"),
    ("TCP header cut", v4(SYN_SEGMENT[:19]), "short-header"),
    ("TCP data offset 4", v4(tcp_segment(1, 2, SYN, data_offset=4)), "short-header"),
    ("TCP data offset past end", v4(tcp_segment(1, 2, SYN, data_offset=6)), "short-header"),
    ("TCP v6 data offset 0", v6(tcp_segment(1, 2, SYN, data_offset=0)), "short-header"),
    ("UDP header cut", v4(udp_datagram(1, 2)[:7], protocol=UDP), "short-header"),
    ("UDP length too big", v4(udp_datagram(1, 2, b"ab", length=11), protocol=UDP), "length-mismatch"),
    ("UDP length too small", v6(udp_datagram(1, 2, b"ab", length=9), next_header=UDP), "length-mismatch"),
    ("UDP length zero (jumbo)", v6(udp_datagram(1, 2, b"ab", length=0), next_header=UDP), "length-mismatch"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in UNFIT], ids=[c[0] for c in UNFIT])
def test_unfit(data, reason):
    assert parse(data) == Unfit(reason)


def test_every_reason_is_exercised():
    assert {c[2] for c in UNFIT} == set(get_args(UnfitReason))


def test_parse_tcp4():
    seg = parse(TCP4)
    assert seg == Segment(
        version=4,
        protocol=TCP,
        src=V4_CLIENT,
        dst=V4_LOCAL,
        sport=40000,
        dport=80,
        l4_offset=20,
        tcp_flags=ACK,
        checksum=struct.unpack_from("!H", TCP4, 36)[0],
    )
    assert not seg.is_syn and not seg.starts_conversation


def test_parse_udp6():
    seg = parse(UDP6)
    assert (seg.version, seg.protocol, seg.src, seg.dst) == (6, UDP, V6_CLIENT, V6_LOCAL)
    assert (seg.sport, seg.dport, seg.l4_offset, seg.tcp_flags) == (5353, 53, 40, 0)
    assert seg.checksum == struct.unpack_from("!H", UDP6, 46)[0]
    assert seg.starts_conversation


def test_parse_tcp6_with_options_and_udp4():
    data = packet(6, TCP, V6_CLIENT, V6_LOCAL, 1, 65535, b"x", flags=SYN, options=bytes(12))
    seg = parse(data)
    assert (seg.version, seg.protocol, seg.sport, seg.dport, seg.l4_offset) == (6, TCP, 1, 65535, 40)
    data = packet(4, UDP, V4_CLIENT, V4_LOCAL, 0, 9, b"")
    seg = parse(data)
    assert (seg.version, seg.protocol, seg.sport, seg.dport, seg.l4_offset) == (4, UDP, 0, 9, 20)
    assert seg.checksum == struct.unpack_from("!H", data, 26)[0]


@pytest.mark.parametrize("protocol", [TCP, UDP])
def test_ipv4_options_are_stepped_over(protocol):
    options = bytes.fromhex("07070400" "00000000" "01010100")  # record route (one slot), NOP NOP NOP EOL
    data = packet(4, protocol, V4_CLIENT, V4_LOCAL, 40000, 8080, b"x", ip_options=options)
    seg = parse(data)
    assert isinstance(seg, Segment), seg
    assert (seg.sport, seg.dport, seg.l4_offset) == (40000, 8080, 32)
    assert seg.checksum == struct.unpack_from("!H", data, 32 + (16 if protocol == TCP else 6))[0]


@pytest.mark.parametrize("chain", [
    [(HOP_BY_HOP, PADN6)],
    [(DEST_OPTS, PADN6 + bytes(8))],
    [(ROUTING, ROUTING_DONE)],
    [(HOP_BY_HOP, PADN6), (ROUTING, ROUTING_DONE), (DEST_OPTS, PADN6)],
], ids=["hop-by-hop", "destination-options-16", "routing-done", "three"])
@pytest.mark.parametrize("protocol", [TCP, UDP])
def test_ipv6_extension_headers_are_walked(chain, protocol):
    data = packet(6, protocol, V6_CLIENT, V6_LOCAL, 5353, 53, b"q", ext=chain)
    seg = parse(data)
    assert isinstance(seg, Segment), seg
    assert (seg.protocol, seg.sport, seg.dport) == (protocol, 5353, 53)
    assert seg.l4_offset == 40 + sum(2 + len(body) for _, body in chain)


def test_dont_fragment_alone_is_fine():
    assert isinstance(parse(v4(SYN_SEGMENT, frag=0x4000)), Segment)
    assert isinstance(parse(v4(SYN_SEGMENT, frag=0x0000)), Segment)


@pytest.mark.parametrize(
    ("flags", "syn"),
    [(SYN, True), (SYN | ACK, False), (ACK, False), (FIN | ACK, False), (RST, False), (SYN | FIN, True)],
)
def test_tcp_flag_helpers(flags, syn):
    seg = parse(packet(4, TCP, V4_CLIENT, V4_LOCAL, 1, 2, flags=flags))
    assert seg.tcp_flags == flags
    assert seg.is_syn is syn and seg.starts_conversation is syn


def test_every_prefix_of_a_packet_is_unfit():
    for data in (TCP4, UDP6):
        for cut in range(len(data)):
            assert isinstance(parse(data[:cut]), Unfit), cut


@pytest.mark.parametrize("version", [4, 6])
def test_parse_head_reads_the_ports_of_a_truncated_copy(version):
    client, local = (V4_CLIENT, V4_LOCAL) if version == 4 else (V6_CLIENT, V6_LOCAL)
    big = packet(version, UDP, client, local, 5353, 53, bytes(8000))
    copy = big[:4016]
    assert parse(copy) == Unfit("truncated")
    head = parse_head(copy)
    assert (head.protocol, head.src, head.dst, head.sport, head.dport) == (UDP, client, local, 5353, 53)
    assert parse_head(big) == parse(big)
    # What is wrong besides the length still is.
    l4 = 20 if version == 4 else 40
    assert parse_head(copy[: l4 + 4]) == Unfit("short-header")
    bad_length = bytearray(copy)
    struct.pack_into("!H", bad_length, l4 + 4, 4)
    assert parse_head(bytes(bad_length)) == Unfit("length-mismatch")


def test_accepts_bytearray_and_memoryview():
    assert parse(bytearray(TCP4)) == parse(TCP4) == parse(memoryview(TCP4))


@given(st.binary(max_size=200))
def test_never_raises(data):
    result = parse(data)
    assert isinstance(result, (Segment, Unfit))
    if isinstance(result, Segment):
        assert result.protocol in (TCP, UDP)
        assert checksum_offset(result) + 2 <= len(data)
