"""with_ports touches the ports and the checksum, nothing else."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import struct

import pytest

from builders import (
    DEST_OPTS,
    HOP_BY_HOP,
    PADN6,
    ROUTING,
    V4_CLIENT,
    V4_LOCAL,
    V6_CLIENT,
    V6_LOCAL,
    checksum_offset,
    checksum_valid,
    differing_offsets,
    packet,
)
from nftdivert.worker.packet import ACK, TCP, UDP, parse
from nftdivert.worker.rewrite import with_ports

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
def test_a_new_dport_changes_only_dport_and_checksum(case, sport, dport, new, payload):
    version, protocol, src, dst = case
    data = packet(version, protocol, src, dst, sport, dport, payload, flags=ACK)
    seg = parse(data)
    out = with_ports(data, seg, sport, new)
    assert isinstance(out, bytes) and len(out) == len(data)
    allowed = {seg.l4_offset + 2, seg.l4_offset + 3, checksum_offset(seg), checksum_offset(seg) + 1}
    assert differing_offsets(data, out) <= allowed
    after = parse(out)
    assert (after.sport, after.dport) == (sport, new)
    assert (after.src, after.dst, after.tcp_flags) == (seg.src, seg.dst, seg.tcp_flags)
    assert checksum_valid(out)


@given(CASES, ports, ports, ports, st.binary(max_size=300))
def test_a_new_sport_changes_only_sport_and_checksum(case, sport, dport, new, payload):
    version, protocol, src, dst = case
    data = packet(version, protocol, src, dst, sport, dport, payload, flags=ACK)
    seg = parse(data)
    out = with_ports(data, seg, new, dport)
    assert len(out) == len(data)
    allowed = {seg.l4_offset, seg.l4_offset + 1, checksum_offset(seg), checksum_offset(seg) + 1}
    assert differing_offsets(data, out) <= allowed
    assert (parse(out).sport, parse(out).dport) == (new, dport)
    assert checksum_valid(out)


def test_rewrite_really_changes_the_port():
    data = packet(4, TCP, V4_CLIENT, V4_LOCAL, 40000, 80)
    seg = parse(data)
    out = with_ports(data, seg, 40000, 8080)
    assert out[22:24] == (8080).to_bytes(2, "big")
    assert out[36:38] != data[36:38]


def test_round_trip_restores_the_original_bytes():
    data = packet(6, UDP, V6_CLIENT, V6_LOCAL, 5353, 53, b"q")
    there = with_ports(data, parse(data), 5353, 1234)
    assert with_ports(there, parse(there), 5353, 53) == data


def test_input_is_left_untouched():
    data = bytearray(packet(4, UDP, V4_CLIENT, V4_LOCAL, 1, 2, b"abc"))
    copy = bytes(data)
    with_ports(data, parse(copy), 9, 2)
    assert data == copy


# Between IP and TCP/UDP: IPv4 options, IPv6 extension headers. The rewrite
# must find the ports behind them and leave them, and the pseudo-header, alone.
ODD_HEADERS = [
    (4, {"ip_options": bytes.fromhex("01010100")}),
    (4, {"ip_options": bytes.fromhex("07070400" "00000000" "01010100")}),
    (6, {"ext": [(HOP_BY_HOP, PADN6)]}),
    (6, {"ext": [(HOP_BY_HOP, PADN6), (ROUTING, bytes([4, 0, 0, 0, 0, 0])), (DEST_OPTS, PADN6 + bytes(8))]}),
]


@pytest.mark.parametrize(("version", "headers"), ODD_HEADERS, ids=["v4-nop", "v4-rr", "v6-hbh", "v6-three"])
@pytest.mark.parametrize("protocol", [TCP, UDP])
@given(sport=ports, dport=ports, new=st.tuples(ports, ports), payload=st.binary(max_size=100))
def test_rewrite_behind_options_and_extension_headers(version, headers, protocol, sport, dport, new, payload):
    src, dst = (V4_CLIENT, V4_LOCAL) if version == 4 else (V6_CLIENT, V6_LOCAL)
    data = packet(version, protocol, src, dst, sport, dport, payload, flags=ACK, **headers)
    seg = parse(data)
    out = with_ports(data, seg, *new)
    at = seg.l4_offset
    assert differing_offsets(data, out) <= set(range(at, at + 4)) | {checksum_offset(seg), checksum_offset(seg) + 1}
    assert (parse(out).sport, parse(out).dport) == new
    assert checksum_valid(out)


def test_ipv6_udp_without_checksum_behind_extension_headers_gets_a_full_one():
    data = bytearray(packet(6, UDP, V6_CLIENT, V6_LOCAL, 5353, 53, b"q", ext=[(DEST_OPTS, PADN6)]))
    seg = parse(bytes(data))
    struct.pack_into("!H", data, checksum_offset(seg), 0)  # "none": invalid for IPv6, repaired on rewrite
    out = with_ports(bytes(data), parse(bytes(data)), 5353, 1338)
    assert parse(out).dport == 1338 and checksum_valid(out)
