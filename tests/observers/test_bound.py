"""Bound sockets from sock_diag, per family and address, and the nft commands that mirror them."""

import socket

import pytest

from nftdivert.observers import bound
from nftdivert.observers.bound import ANY, TCP, UDP, Listening

V4 = socket.AF_INET
V6 = socket.AF_INET6
LO4, LO6 = socket.inet_pton(V4, "127.0.0.1"), socket.inet_pton(V6, "::1")
GW4, GW6 = socket.inet_pton(V4, "192.0.2.1"), socket.inet_pton(V6, "2001:db8:1::1")


def test_a_socket_counts_only_for_its_family_and_address():
    ports = bound.from_sockets([
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


@pytest.mark.kernel
def test_sock_diag_reports_address_family_and_v6only(host):
    code = (
        "import socket, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nftdivert.observers import bound\n"
        "t = socket.socket(socket.AF_INET6); t.bind(('::', 7001)); t.listen()\n"
        "o = socket.socket(socket.AF_INET6); o.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
        "o.bind(('::', 7002)); o.listen()\n"
        "l = socket.socket(); l.bind(('127.0.0.1', 7003)); l.listen()\n"
        "n = socket.socket(); n.bind(('127.0.0.1', 7004))  # bound, but nobody accepts there\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 7005))\n"
        "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.bind(('0.0.0.0', 7006)); c.connect(('127.0.0.1', 9))\n"
        "print(sorted((s.protocol, s.family, socket.inet_ntop(s.family, s.address), s.port, s.v6only)"
        " for s in bound.sockets()))\n")
    from conftest import REPO
    out = host.run("python3", "-c", code, str(REPO)).stdout
    assert eval(out) == [  # noqa: S307 - our own repr of tuples
        (TCP, V4, "127.0.0.1", 7003, False),
        (TCP, V6, "::", 7001, False),
        (TCP, V6, "::", 7002, True),
        (UDP, V4, "127.0.0.1", 7005, False),  # the connected one (7006) hears only its peer
    ]


def test_set_commands_replace_the_sets_in_one_go():
    ports = bound.from_sockets([Listening(TCP, V4, bytes(4), 443), Listening(TCP, V6, bytes(16), 22),
                                Listening(TCP, V4, LO4, 22), Listening(UDP, V6, LO6, 53)])
    text = bound.set_commands("lab", ports)
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
    v4 = lambda last, flags=0: bound.InterfaceAddress(socket.AF_INET, 24, flags, 0, 3, bytes([192, 0, 2, last]))  # noqa: E731
    v6 = lambda last, scope=0, flags=0: bound.InterfaceAddress(  # noqa: E731
        socket.AF_INET6, 64, flags, scope, 3, bytes.fromhex("20010db8000100000000000000000000")[:15] + bytes([last]))
    found = bound.addresses_of([
        v4(9, flags=0x01),  # secondary: never the redirect's
        v4(1), v4(2, flags=0x01),
        v6(7, flags=0x40),  # tentative (DAD not done)
        v6(8, scope=253),  # link scope
        v6(9), v6(10),
    ])
    assert found.redirect_to == {(4, 3, bytes([192, 0, 2, 1])), (6, 3, v6(9).address)}
    assert len(found.local) == 7
