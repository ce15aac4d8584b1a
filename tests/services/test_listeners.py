"""Built-in listeners on real sockets (loopback, free ports)."""

from __future__ import annotations

import ipaddress
import socket
import struct

import dns.message
import pytest

from nftdivert.config import HttpConfig, Listener, from_mapping
from nftdivert.services.dns import Resolver
from nftdivert.services.names import AnswerPool
from nftdivert.errors import ConfigError
from nftdivert.services.listeners import Listeners


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


def http_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    return head, body


def test_http_request_gets_a_neutral_200(running):
    _, ports = running
    head, body = http_exchange(ports["t"], b"GET /index.html HTTP/1.1\r\nHost: anything.example\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert lines[1] == "Server: nginx" and lines[2].startswith("Date: ") and lines[2].endswith(" GMT")
    assert f"Content-Length: {len(body)}" in lines and "Content-Type: text/html" in lines
    assert body == HttpConfig().body.encode() and body.startswith(b"<!DOCTYPE html>")
    assert b"nftdivert" not in (head + body).lower()
    head, body = http_exchange(ports["t"], b"HEAD / HTTP/1.0\r\n\r\n")
    assert body == b"" and f"Content-Length: {len(HttpConfig().body)}".encode() in head


def test_the_http_answer_is_configurable():
    port = free_port(socket.SOCK_STREAM)
    lst = Listeners((Listener("t", "tcp", port),),
                    http=HttpConfig(server="Apache/2.4.41 (Ubuntu)", content_type="text/plain", body="ok\n"))
    lst.start()
    try:
        head, body = http_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        lst.stop()
    assert b"\r\nServer: Apache/2.4.41 (Ubuntu)\r\n" in head and b"Content-Type: text/plain" in head
    assert body == b"ok\n"
    no_server = Listeners((Listener("t", "tcp", port),), http=HttpConfig(server=""))
    no_server.start()
    try:
        head, _ = http_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        no_server.stop()
    assert b"Server:" not in head


@pytest.mark.parametrize("section, key, reason", [
    ({"server": "nginx\r\nX-Evil: 1"}, "http.server", "no line breaks"),
    ({"server": " nginx"}, "http.server", "visible ASCII"),
    ({"server": "caf\u00e9"}, "http.server", "visible ASCII"),
    ({"server": 1}, "http.server", "not int"),
    ({"content_type": ""}, "http.content_type", "1-256"),
    ({"body": ["x"]}, "http.body", "not list"),
    ({"body": "x" * 65537}, "http.body", "64 KiB"),
    ({"banner": "x"}, "http.banner", "unknown key"),
])
def test_bad_http_config_names_the_key(section, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"http": section})
    assert info.value.key == key and reason in str(info.value)


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


def test_an_empty_datagram_is_echoed(running):
    _, ports = running
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"", ("127.0.0.1", ports["u"]))
        assert s.recvfrom(16) == (b"", ("127.0.0.1", ports["u"]))


def test_the_urgent_byte_is_echoed_in_place(running):
    _, ports = running
    with socket.create_connection(("127.0.0.1", ports["t"]), timeout=5) as s:
        s.sendall(b"before")
        s.send(b"!", socket.MSG_OOB)
        s.sendall(b"after")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == b"before!after"


def test_udp_answers_by_the_original_port_asked_with_the_local_address_it_came_to():
    port, asked = free_port(socket.SOCK_DGRAM), []

    async def origin(client, local, protocol=6):
        asked.append((local, protocol))
        return ("198.51.100.9", 37)  # Time

    lst = Listeners((Listener("u", "udp", port),), origin=origin)
    lst.start()
    try:
        for host in ("127.0.0.1", "::1"):
            family = socket.AF_INET if "." in host else socket.AF_INET6
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(b"", (host, port))
                assert len(s.recvfrom(100)[0]) == 4
    finally:
        lst.stop()
    assert asked == [(("127.0.0.1", port), 17), (("::1", port), 17)]
