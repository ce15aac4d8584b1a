"""sock_diag: the sockets that listen, against the kernel; a conversation's socket, its messages."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from conftest import REPO
from nftdivert.netlink import sock_diag
from nftdivert.netlink.ipproto import TCP, UDP

V4 = socket.AF_INET
V6 = socket.AF_INET6


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


@pytest.mark.kernel
def test_listening_reports_address_family_and_v6only(host):
    code = (
        "import socket, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nftdivert.netlink import sock_diag\n"
        "t = socket.socket(socket.AF_INET6); t.bind(('::', 7001)); t.listen()\n"
        "o = socket.socket(socket.AF_INET6); o.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
        "o.bind(('::', 7002)); o.listen()\n"
        "l = socket.socket(); l.bind(('127.0.0.1', 7003)); l.listen()\n"
        "n = socket.socket(); n.bind(('127.0.0.1', 7004))  # bound, but nobody accepts there\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 7005))\n"
        "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.bind(('0.0.0.0', 7006)); c.connect(('127.0.0.1', 9))\n"
        "print(sorted((s.protocol, s.family, socket.inet_ntop(s.family, s.address), s.port, s.v6only)"
        " for s in sock_diag.listening()))\n")
    out = host.run("python3", "-c", code, str(REPO)).stdout
    assert eval(out) == [  # noqa: S307 - our own repr of tuples
        (TCP, V4, "127.0.0.1", 7003, False),
        (TCP, V6, "::", 7001, False),
        (TCP, V6, "::", 7002, True),
        (UDP, V4, "127.0.0.1", 7005, False),  # the connected one (7006) hears only its peer
    ]


def test_sock_diag_looks_tcp_up_from_the_socket_and_udp_from_the_peer():
    client, asked = _packed("192.0.2.2"), _packed("198.51.100.7")
    tcp = sock_diag.lookup_request(6, client, 40000, asked, 443)
    family, proto, _ext, states, sport, dport, src, dst, _if, cookie = sock_diag.REQ.unpack_from(tcp, 16)
    assert (family, proto, states, sport, dport) == (socket.AF_INET, 6, 0xFFFFFFFF, b"\x9c\x40", b"\x01\xbb")
    assert (src[:4], dst[:4], cookie) == (client, asked, b"\xff" * 8)
    udp = sock_diag.lookup_request(17, client, 40000, asked, 53)
    _f, _p, _e, _s, sport, dport, src, dst, _i, _c = sock_diag.REQ.unpack_from(udp, 16)
    assert (sport, dport, src[:4], dst[:4]) == (b"\x00\x35", b"\x9c\x40", asked, client)


def test_sock_diag_answers():
    head = struct.pack("=IHHII", 16 + 72, 20, 0, 1, 0)
    msg = struct.pack("=BBBB48xIIIII", 2, 1, 0, 0, 0, 0, 0, 1000, 4242)
    assert sock_diag.parse_answer(head + msg) == (1000, 4242)
    error = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -2) + bytes(16)
    assert sock_diag.parse_answer(error) is None and sock_diag.parse_answer(b"") is None


@pytest.mark.kernel
def test_the_owner_of_a_conversation_is_its_clients_socket(host):
    """TCP by the client's own side, UDP by the peer's: both find the client's socket (uid, inode)."""
    code = (
        "import os, socket, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nftdivert.netlink import sock_diag\n"
        "lo = socket.inet_aton('127.0.0.1')\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 7010)); srv.listen()\n"
        "tcp = socket.create_connection(('127.0.0.1', 7010))\n"
        "udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.connect(('127.0.0.1', 7011))\n"
        "with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as diag:\n"
        "    for proto, s in ((6, tcp), (17, udp)):\n"
        "        port = s.getsockname()[1]\n"
        "        print(sock_diag.owner(diag, proto, lo, port, lo, s.getpeername()[1]) == (os.getuid(), os.fstat(s.fileno()).st_ino))\n"
        "    print(sock_diag.owner(diag, 6, lo, 1, lo, 7010))\n")
    host.run("ip", "link", "set", "lo", "up")
    assert host.run("python3", "-c", code, str(REPO)).stdout.split() == ["True", "True", "None"]


@pytest.mark.kernel
@pytest.mark.vm  # the stock kernel's SOCK_DESTROY of a TIME_WAIT socket, which the worker relies on
def test_a_socket_in_time_wait_is_found_and_closed_by_its_cookie(host):
    """The side that closes first waits in TIME_WAIT; SOCK_DESTROY ends that at
    once. Once it has gone, the same tuple finds the listening socket: a
    request with the old socket's cookie must not touch that."""
    code = (
        "import errno, socket, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from nftdivert.netlink import sock_diag\n"
        "lo = socket.inet_aton('127.0.0.1')\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 7020)); srv.listen()\n"
        "cli = socket.create_connection(('127.0.0.1', 7020))\n"
        "conn, peer = srv.accept()\n"
        "ends = (lo, 7020, lo, peer[1])\n"
        "with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4) as diag:\n"
        "    print(sock_diag.tcp_socket(diag, *ends)[0])\n"  # 1: established
        "    conn.close(); assert cli.recv(1) == b''; cli.close()\n"  # the server first
        "    state, cookie = sock_diag.tcp_socket(diag, *ends)\n"
        "    print(state)\n"
        "    sock_diag.destroy_tcp(diag, *ends, cookie)\n"
        "    state, listening = sock_diag.tcp_socket(diag, *ends)\n"
        "    print(state)\n"  # the listening socket now
        "    try:\n"
        "        sock_diag.destroy_tcp(diag, *ends, cookie)\n"
        "    except OSError as exc:\n"
        "        print(exc.errno in (errno.ESTALE, errno.ENOENT))\n"
        "    print(sock_diag.tcp_socket(diag, *ends) == (10, listening))\n")
    host.run("ip", "link", "set", "lo", "up")
    assert host.run("python3", "-c", code, str(REPO)).stdout.split() == \
        ["1", str(sock_diag.TCP_TIME_WAIT), "10", "True", "True"]
