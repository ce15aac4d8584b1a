"""with_dport/with_sport touch the port and the checksum, nothing else."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from builders import V4_CLIENT, V4_LOCAL, V6_CLIENT, V6_LOCAL, checksum_valid, differing_offsets, packet
from nftdivert.packet import ACK, TCP, UDP, parse
from nftdivert.rewrite import with_dport, with_sport

CASES = st.sampled_from(
    [
        (4, TCP, V4_CLIENT, V4_LOCAL),
        (4, UDP, V4_CLIENT, V4_LOCAL),
        (6, TCP, V6_CLIENT, V6_LOCAL),
        (6, UDP, V6_CLIENT, V6_LOCAL),
    ]
)
ports = st.integers(0, 65535)


@given(CASES, ports, ports, ports, st.binary(max_size=300))
def test_with_dport_changes_only_dport_and_checksum(case, sport, dport, new, payload):
    version, protocol, src, dst = case
    data = packet(version, protocol, src, dst, sport, dport, payload, flags=ACK)
    seg = parse(data)
    out = with_dport(data, seg, new)
    assert isinstance(out, bytes) and len(out) == len(data)
    allowed = {seg.l4_offset + 2, seg.l4_offset + 3, seg.checksum_offset, seg.checksum_offset + 1}
    assert differing_offsets(data, out) <= allowed
    after = parse(out)
    assert (after.sport, after.dport) == (sport, new)
    assert (after.src, after.dst, after.tcp_flags) == (seg.src, seg.dst, seg.tcp_flags)
    assert checksum_valid(out)


@given(CASES, ports, ports, ports, st.binary(max_size=300))
def test_with_sport_changes_only_sport_and_checksum(case, sport, dport, new, payload):
    version, protocol, src, dst = case
    data = packet(version, protocol, src, dst, sport, dport, payload, flags=ACK)
    seg = parse(data)
    out = with_sport(data, seg, new)
    assert len(out) == len(data)
    allowed = {seg.l4_offset, seg.l4_offset + 1, seg.checksum_offset, seg.checksum_offset + 1}
    assert differing_offsets(data, out) <= allowed
    assert (parse(out).sport, parse(out).dport) == (new, dport)
    assert checksum_valid(out)


def test_rewrite_really_changes_the_port():
    data = packet(4, TCP, V4_CLIENT, V4_LOCAL, 40000, 80)
    seg = parse(data)
    out = with_dport(data, seg, 8080)
    assert out[22:24] == (8080).to_bytes(2, "big")
    assert out[36:38] != data[36:38]


def test_round_trip_restores_the_original_bytes():
    data = packet(6, UDP, V6_CLIENT, V6_LOCAL, 5353, 53, b"q")
    there = with_dport(data, parse(data), 1234)
    assert with_dport(there, parse(there), 53) == data


def test_input_is_left_untouched():
    data = bytearray(packet(4, UDP, V4_CLIENT, V4_LOCAL, 1, 2, b"abc"))
    copy = bytes(data)
    with_sport(data, parse(copy), 9)
    assert data == copy
