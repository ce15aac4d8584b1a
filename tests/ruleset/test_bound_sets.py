"""Bound sockets per family and address, and the nft commands that mirror them (pure)."""

import socket

from nftdivert.netlink.ipproto import TCP, UDP
from nftdivert.netlink.rtnetlink import InterfaceAddress
from nftdivert.netlink.sock_diag import Listening
from nftdivert.ruleset import bound_sets

V4 = socket.AF_INET
V6 = socket.AF_INET6
LO4, LO6 = socket.inet_pton(V4, "127.0.0.1"), socket.inet_pton(V6, "::1")
GW4, GW6 = socket.inet_pton(V4, "192.0.2.1"), socket.inet_pton(V6, "2001:db8:1::1")


def test_a_socket_counts_only_for_its_family_and_address():
    ports = bound_sets.from_sockets([
        Listening(TCP, V4, LO4, 9000),            # 127.0.0.1:9000
        Listening(TCP, V6, LO6, 9001),            # [::1]:9001
        Listening(TCP, V4, bytes(4), 8000),       # 0.0.0.0:8000, IPv4 only
        Listening(UDP, V6, bytes(16), 53),        # [::]:53 dual-stack
        Listening(UDP, V6, bytes(16), 54, v6only=True),
        Listening(UDP, V6, bytes(10) + b"\xff\xff" + GW4, 55),  # [::ffff:192.0.2.1]:55
    ])
    assert ports.is_bound(TCP, LO4, 9000) and not ports.is_bound(TCP, GW4, 9000)
    assert ports.is_bound(TCP, LO6, 9001) and not ports.is_bound(TCP, GW6, 9001)
    assert not ports.is_bound(TCP, LO4, 9001) and not ports.is_bound(TCP, LO6, 9000)
    assert ports.is_bound(TCP, GW4, 8000) and not ports.is_bound(TCP, GW6, 8000)
    assert ports.is_bound(UDP, GW4, 53) and ports.is_bound(UDP, GW6, 53)
    assert ports.is_bound(UDP, GW6, 54) and not ports.is_bound(UDP, GW4, 54)
    assert ports.is_bound(UDP, GW4, 55) and not ports.is_bound(UDP, LO4, 55)
    assert not ports.is_bound(UDP, GW4, 9000)  # TCP's, not UDP's


def test_set_commands_replace_the_sets_in_one_go():
    ports = bound_sets.from_sockets([Listening(TCP, V4, bytes(4), 443), Listening(TCP, V6, bytes(16), 22),
                                Listening(TCP, V4, LO4, 22), Listening(UDP, V6, LO6, 53)])
    text = bound_sets.set_commands("lab", ports)
    assert text.splitlines() == [
        "flush set inet lab bound_tcp_v4",
        "add element inet lab bound_tcp_v4 { 0.0.0.0/0 . 22, 0.0.0.0/0 . 443 }",  # 127.0.0.1:22 is covered
        "flush set inet lab bound_tcp_v6",
        "add element inet lab bound_tcp_v6 { ::/0 . 22 }",
        "flush set inet lab bound_udp_v4",
        "flush set inet lab bound_udp_v6",
        "add element inet lab bound_udp_v6 { ::1 . 53 }",
    ]


def test_the_redirect_address_is_the_primary_ipv4_and_the_first_usable_global_ipv6():
    v4 = lambda last, flags=0: InterfaceAddress(socket.AF_INET, 24, flags, 0, 3, bytes([192, 0, 2, last]))  # noqa: E731
    v6 = lambda last, scope=0, flags=0: InterfaceAddress(  # noqa: E731
        socket.AF_INET6, 64, flags, scope, 3, bytes.fromhex("20010db8000100000000000000000000")[:15] + bytes([last]))
    found = bound_sets.addresses_of([
        v4(9, flags=0x01),  # secondary: never the redirect's
        v4(1), v4(2, flags=0x01),
        v6(7, flags=0x40),  # tentative (DAD not done)
        v6(8, scope=253),  # link scope
        v6(9), v6(10),
    ])
    assert found.redirect_to == {(4, 3, bytes([192, 0, 2, 1])), (6, 3, v6(9).address)}
    assert len(found.local) == 7
