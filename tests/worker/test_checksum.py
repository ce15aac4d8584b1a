"""Checksums: known answers, and incremental rewrites equal full recomputation."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import (
    checksum_field,
    checksum_offset,
    checksum_valid,
    ones_sum,
    packet,
    pseudo_header,
    split,
    tcp_segment,
    udp_datagram,
    with_checksum,
    wrap,
)
from nftdivert.worker.checksum import internet_checksum, l4_checksum
from nftdivert.worker.packet import TCP, UDP, parse
from nftdivert.worker.rewrite import with_ports

# ---------------------------------------------------------------- known answers


def test_rfc1071_numerical_example():
    # RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_ipv4_header_example():
    # Widely published worked example (checksum field zeroed) -> 0x442e.
    header = bytes.fromhex("45000030442240008006" "0000" "8c7c19acae241e2b")
    assert internet_checksum(header) == 0x442E
    # and a header carrying its checksum sums to -0
    assert internet_checksum(header[:10] + b"\x44\x2e" + header[12:]) == 0


@pytest.mark.parametrize(
    ("hc", "m", "m_new", "expected"),
    [
        (0xDD2F, 0x5555, 0x3285, 0x0000),  # RFC 1624 section 4 (eqn. 2 gives 0xFFFF)
        (0x0000, 0x5555, 0x5555, 0x0000),  # RFC 1624 errata 5864: unchanged word
        (0x0000, 0x5555, 0x5556, 0xFFFE),  # errata 5864: carry folds twice
        (0x1234, 0x0000, 0x0000, 0x1234),
    ],
)
def test_incremental_update_known_answers(hc, m, m_new, expected):
    """RFC 1624 eqn. 3 as the rewrite applies it: TCP, where a computed 0 goes out as 0."""
    data = bytearray(packet(4, TCP, V4_A, V4_B, 40000, m))
    seg = parse(bytes(data))
    struct.pack_into("!H", data, checksum_offset(seg), hc)
    assert checksum_field(with_ports(bytes(data), parse(bytes(data)), 40000, m_new)) == expected


V4_A = bytes([192, 0, 2, 1])
V4_B = bytes([192, 0, 2, 2])
V6_LO = bytes(15) + b"\x01"


def test_udp_ipv4_hand_computed():
    # pseudo c000+0201 + c000+0202 + 0011 + 000a
    # udp   0400 + 0035 + 000a + (0000) + payload 0102
    # = 0x1895f -> fold 0x8960 -> ~ = 0x769f
    l4 = udp_datagram(1024, 53, b"\x01\x02")
    assert l4_checksum(4, V4_A, V4_B, UDP, l4) == 0x769F
    data = wrap(4, V4_A, V4_B, UDP, with_checksum(4, V4_A, V4_B, UDP, l4))
    # dport 0x0035 -> 0x1f75: sum 0x8960 + 0x1f40 = 0xa8a0 -> ~ = 0x575f
    assert checksum_field(with_ports(data, parse(data), 1024, 8053)) == 0x575F


def test_udp_ipv6_hand_computed_and_zero_result():
    # pseudo ::1, ::1, length 000a, next header 0011; header 0400 0035 000a
    # payload 0102: sum 0x055e -> ~ = 0xfaa1
    assert l4_checksum(6, V6_LO, V6_LO, UDP, udp_datagram(1024, 53, b"\x01\x02")) == 0xFAA1
    # payload fba3 brings the sum to 0xffff: computed 0 must go out as 0xffff
    assert l4_checksum(6, V6_LO, V6_LO, UDP, udp_datagram(1024, 53, b"\xfb\xa3")) == 0xFFFF
    # TCP has no such rule: a computed 0 is sent as 0
    s = ones_sum(pseudo_header(6, V6_LO, V6_LO, TCP, 20) + tcp_segment(1, 2, 0, seq=0))
    fixed = tcp_segment(1, 2, 0, seq=0xFFFF - s)  # fills the sum up to 0xffff
    assert l4_checksum(6, V6_LO, V6_LO, TCP, fixed) == 0


def test_l4_checksum_ignores_current_field():
    l4 = udp_datagram(1024, 53, b"\x01\x02", checksum=0xBEEF)
    assert l4_checksum(4, V4_A, V4_B, UDP, l4) == 0x769F


# ---------------------------------------------------------------- properties

ports = st.integers(0, 65535)
payloads = st.binary(max_size=1500)


@st.composite
def packets(draw, protocols=(TCP, UDP)):
    version = draw(st.sampled_from((4, 6)))
    protocol = draw(st.sampled_from(protocols))
    size = 4 if version == 4 else 16
    src = draw(st.binary(min_size=size, max_size=size))
    dst = draw(st.binary(min_size=size, max_size=size))
    options = b""
    flags = 0
    if protocol == TCP:
        options = draw(st.binary(max_size=10).map(lambda b: b * 4))  # multiple of 4, <= 40
        flags = draw(st.integers(0, 255))
    payload = draw(payloads)
    return packet(version, protocol, src, dst, draw(ports), draw(ports), payload, flags=flags, options=options)


def rewrite_any(data, side, port):
    seg = parse(data)
    return with_ports(data, seg, seg.sport, port) if side == "dport" else with_ports(data, seg, port, seg.dport)


def reference(data):
    version, src, dst, protocol, l4 = split(data)
    return l4_checksum(version, src, dst, protocol, l4)


@settings(max_examples=400)
@given(packets(), st.sampled_from(("sport", "dport")), ports)
def test_rewrite_equals_full_recomputation(data, side, port):
    assert checksum_field(data) == reference(data)
    out = rewrite_any(data, side, port)
    assert checksum_field(out) == reference(out)
    assert checksum_valid(out)


@settings(max_examples=400)
@given(packets(), ports, ports)
def test_rewriting_both_ports_equals_full_recomputation(data, sport, dport):
    # A client port that clashes at the listener gets an alias: both ports change.
    out = with_ports(data, parse(data), sport, dport)
    assert checksum_field(out) == reference(out)
    assert checksum_valid(out)


def force_zero_checksum(data):
    """Replace the first payload word so that the computed checksum is 0."""
    version, src, dst, protocol, l4 = split(data)
    seg = parse(data)
    at = checksum_offset(seg) - seg.l4_offset
    head = 8 if protocol == UDP else (l4[12] >> 4) * 4  # payload starts here
    body = bytearray(l4)
    body[at : at + 2] = b"\0\0"
    body[head : head + 2] = b"\0\0"
    s = ones_sum(pseudo_header(version, src, dst, protocol, len(body)) + bytes(body))
    struct.pack_into("!H", body, head, 0xFFFF - s)
    return wrap(version, src, dst, protocol, with_checksum(version, src, dst, protocol, bytes(body)))


@settings(max_examples=200)
@given(packets(), st.sampled_from(("sport", "dport")), ports, st.binary(min_size=2, max_size=200))
def test_rewrite_from_a_zero_computed_checksum(data, side, port, payload):
    version, src, dst, protocol, _ = split(data)
    seg = parse(data)
    base = packet(version, protocol, src, dst, seg.sport, seg.dport, payload, flags=seg.tcp_flags)
    zero = force_zero_checksum(base)
    # TCP carries the computed 0 as 0, UDP as 0xFFFF
    assert checksum_field(zero) == (0 if protocol == TCP else 0xFFFF)
    out = rewrite_any(zero, side, port)
    assert checksum_field(out) == reference(out)
    assert checksum_valid(out)


@settings(max_examples=200)
@given(packets(), st.sampled_from(("sport", "dport")))
def test_rewrite_whose_result_would_be_zero(data, side):
    version, src, dst, protocol, l4 = split(data)
    seg = parse(data)
    at = 0 if side == "sport" else 2
    body = bytearray(l4)
    body[at : at + 2] = b"\0\0"
    cks = checksum_offset(seg) - seg.l4_offset
    body[cks : cks + 2] = b"\0\0"
    port = 0xFFFF - ones_sum(pseudo_header(version, src, dst, protocol, len(body)) + bytes(body))
    out = rewrite_any(data, side, port)
    if protocol == UDP:
        assert checksum_field(out) == 0xFFFF  # never 0, v4 or v6
    else:
        assert checksum_field(out) == 0
    assert checksum_valid(out)


@given(packets(protocols=(UDP,)).filter(lambda d: d[0] >> 4 == 4), st.sampled_from(("sport", "dport")), ports)
def test_udp_ipv4_without_checksum_stays_without(data, side, port):
    no_checksum = bytearray(data)
    no_checksum[26:28] = b"\0\0"
    out = rewrite_any(bytes(no_checksum), side, port)
    assert checksum_field(out) == 0


@given(packets(protocols=(UDP,)).filter(lambda d: d[0] >> 4 == 6), st.sampled_from(("sport", "dport")), ports)
def test_udp_ipv6_zero_checksum_is_never_emitted(data, side, port):
    zeroed = bytearray(data)
    zeroed[46:48] = b"\0\0"
    out = rewrite_any(bytes(zeroed), side, port)
    assert checksum_field(out) != 0
    assert checksum_field(out) == reference(out)


@given(st.binary(max_size=300))
def test_internet_checksum_matches_independent_sum(data):
    assert internet_checksum(data) == ~ones_sum(data) & 0xFFFF
