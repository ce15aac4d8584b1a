"""Built-in listeners on real sockets (loopback, free ports)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import dns.message
import pytest

from nftdivert.config import Listener
from nftdivert.dns import AnswerPool, Resolver
from nftdivert.listeners import Listeners


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


@pytest.fixture
def running():
    tcp, udp = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    dns_udp, dns_tcp = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    resolver = Resolver(AnswerPool(ipaddress.ip_network("198.51.100.0/24")),
                        AnswerPool(ipaddress.ip_network("2001:db8:53::/64")))
    lst = Listeners((Listener("t", "tcp", tcp), Listener("u", "udp", udp),
                     Listener("d", "udp", dns_udp, kind="dns"), Listener("dt", "tcp", dns_tcp, kind="dns"),
                     Listener("x", "tcp", 9, kind="external")), resolver=resolver)
    lst.start()
    try:
        yield lst, {"t": tcp, "u": udp, "d": dns_udp, "dt": dns_tcp}
    finally:
        lst.stop()


def test_tcp_echoes_everything_both_families_and_counts(running):
    lst, ports = running
    payload = bytes(range(256)) * 1000
    for host in ("127.0.0.1", "::1"):
        with socket.create_connection((host, ports["t"]), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        assert got == payload
    assert lst.stats["t"].conversations == 2
    assert lst.stats["t"].bytes_received == 2 * len(payload)
    assert "x" not in lst.stats  # external listeners are someone else's program


def test_http_request_gets_a_200(running):
    _, ports = running
    with socket.create_connection(("127.0.0.1", ports["t"]), timeout=5) as s:
        s.sendall(b"GET /index.html HTTP/1.1\r\nHost: anything.example\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b"nftdivert: answered GET /index.html HTTP/1.1\n"


def test_udp_echo(running):
    _, ports = running
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"ping?", ("127.0.0.1", ports["u"]))
        assert s.recvfrom(100)[0] == b"ping?"


def test_dns_over_udp_and_tcp(running):
    _, ports = running
    query = dns.message.make_query("c2.example", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(query.to_wire(), ("127.0.0.1", ports["d"]))
        reply = dns.message.from_wire(s.recvfrom(4096)[0])
    assert str(reply.answer[0][0]) == "198.51.100.1"
    query6 = dns.message.make_query("c2.example", "AAAA")
    wire = query6.to_wire()
    with socket.create_connection(("::1", ports["dt"]), timeout=5) as s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        size = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < size:
            data += s.recv(size - len(data))
    assert str(dns.message.from_wire(data).answer[0][0]) == "2001:db8:53::1"


def test_a_taken_port_names_the_listener():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lst = Listeners((Listener("busy", "tcp", port),))
        with pytest.raises(OSError, match=f"listener busy \\(tcp port {port}\\)"):
            lst.start()
        lst.stop()
