"""The small pure parts around the observer: interfaces, sock_diag messages, the sysctls."""

from __future__ import annotations

import ipaddress
import socket
import struct

from nftdivert.observers import ctsettings, links, procowner

SUBNETS = [(ipaddress.ip_network("192.0.2.0/24"), "eth1", ipaddress.ip_address("192.0.2.1").packed),
           (ipaddress.ip_network("192.0.2.128/25"), "eth2", ipaddress.ip_address("192.0.2.129").packed),
           (ipaddress.ip_network("2001:db8:1::/64"), "eth1", ipaddress.ip_address("2001:db8:1::1").packed)]


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_the_interface_is_the_longest_prefix_holding_the_client():
    assert links.interface_for(_packed("192.0.2.7"), SUBNETS) == "eth1"
    assert links.interface_for(_packed("192.0.2.200"), SUBNETS) == "eth2"
    assert links.interface_for(_packed("2001:db8:1::2"), SUBNETS) == "eth1"
    assert links.interface_for(_packed("192.0.2.129"), SUBNETS) == "lo"  # our own address: local mode
    assert links.interface_for(_packed("203.0.113.5"), SUBNETS) == ""  # routed to us: no subnet of ours


def test_sock_diag_looks_tcp_up_from_the_socket_and_udp_from_the_peer():
    client, asked = _packed("192.0.2.2"), _packed("198.51.100.7")
    tcp = procowner.lookup_request(6, client, 40000, asked, 443)
    family, proto, _ext, states, sport, dport, src, dst, _if, cookie = procowner._REQ.unpack_from(tcp, 16)
    assert (family, proto, states, sport, dport) == (socket.AF_INET, 6, 0xFFFFFFFF, b"\x9c\x40", b"\x01\xbb")
    assert (src[:4], dst[:4], cookie) == (client, asked, b"\xff" * 8)
    udp = procowner.lookup_request(17, client, 40000, asked, 53)
    _f, _p, _e, _s, sport, dport, src, dst, _i, _c = procowner._REQ.unpack_from(udp, 16)
    assert (sport, dport, src[:4], dst[:4]) == (b"\x00\x35", b"\x9c\x40", asked, client)


def test_sock_diag_answers():
    head = struct.pack("=IHHII", 16 + 72, 20, 0, 1, 0)
    msg = struct.pack("=BBBB48xIIIII", 2, 1, 0, 0, 0, 0, 0, 1000, 4242)
    assert procowner.parse_answer(head + msg) == (1000, 4242)
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    assert procowner.parse_answer(error) is None and procowner.parse_answer(b"") is None


def test_accounting_is_turned_on_and_restored_whatever_happens(tmp_path):
    acct, stamp, absent = tmp_path / "acct", tmp_path / "stamp", tmp_path / "absent"
    acct.write_text("0\n")
    stamp.write_text("1\n")
    try:
        with ctsettings.accounting((acct, stamp, absent)) as before:
            assert before == {acct: "0", stamp: "1"}
            assert acct.read_text() == stamp.read_text() == "1\n"
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert acct.read_text() == "0\n" and stamp.read_text() == "1\n" and not absent.exists()
