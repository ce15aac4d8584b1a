"""SOCKS and HTTP CONNECT on real loopback sockets: the tunnel leads back into our own answers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess

import pytest

import c2served
from nftdivert.config import HttpConfig
from nftdivert.services import default_tcp, http


c2 = pytest.fixture(c2served.served, name="c2")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_all(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def recv_exactly(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, f"closed after {got!r}"
        got += chunk
    return got


def domain(name: str) -> bytes:
    return b"\x03" + bytes([len(name)]) + name.encode()


def socks5_open(s: socket.socket, address: bytes, port: int) -> None:
    """No authentication, then CONNECT to the address (its type byte first) and port, granted."""
    s.sendall(b"\x05\x01\x00")
    assert recv_exactly(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00" + address + struct.pack("!H", port))
    assert recv_exactly(s, 10)[:2] == b"\x05\x00"


def test_socks5_with_a_password_logs_it_and_the_tunnel_gets_http(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x05\x01\x02")  # username/password only
        assert recv_exactly(s, 2) == b"\x05\x02"
        s.sendall(b"\x01\x03bot\x07hunter2")
        assert recv_exactly(s, 2) == b"\x01\x00"
        s.sendall(b"\x05\x01\x00" + domain("c2.example") + struct.pack("!H", 8080))
        assert recv_exactly(s, 10)[:2] == b"\x05\x00"
        s.sendall(b"GET /a.json HTTP/1.1\r\nHost: c2.example:8080\r\n\r\n")
        assert read_all(s).endswith(b"\r\n\r\n{}\n")
    (proxy,) = c2.of("proxy")
    assert proxy["kind"] == "socks5" and proxy["target"] == "c2.example:8080"
    assert (proxy["user"], proxy["password"], proxy["command"]) == ("bot", "hunter2", "connect")
    (req,) = c2.of("http")
    assert req["url"] == "http://c2.example:8080/a.json" and req["tunnel"] == "c2.example:8080"


def test_socks5_to_an_ipv6_address_gets_tls_with_a_leaf_for_that_address(c2):
    with connect(c2.port) as s:
        socks5_open(s, b"\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::7"), 443)
        ctx = ssl.create_default_context(cafile=str(c2.ca))
        ctx.check_hostname = False  # no SNI for an address: the leaf names the address
        with ctx.wrap_socket(s) as tls:
            cert = tls.getpeercert()
    assert ("IP Address", "2001:DB8:0:0:0:0:0:7") in cert["subjectAltName"]
    assert c2.of("proxy")[0]["target"] == "[2001:db8::7]:443"
    assert c2.of("tls")[0]["tunnel"] == "[2001:db8::7]:443"


def test_socks5_udp_associate_is_refused_and_logged(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x03\x00\x01\0\0\0\0\0\0")
        assert recv_exactly(s, 10)[:2] == b"\x05\x07"  # command not supported
    (proxy,) = c2.of("proxy")
    assert proxy["command"] == "udp_associate" and "target" not in proxy


def test_socks4_tunnel_with_silence_inside_gets_the_echo_of_what_follows(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x04\x01" + struct.pack("!H", 4444) + socket.inet_aton("192.0.2.9") + b"agent\0")
        assert recv_exactly(s, 8)[:2] == b"\x00\x5a"
        s.sendall(b"\x00\x01binary beacon")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"\x00\x01binary beacon"
    (proxy,) = c2.of("proxy")
    assert (proxy["kind"], proxy["user"], proxy["target"]) == ("socks4", "agent", "192.0.2.9:4444")


def test_a_socks_greeting_cut_short_is_logged(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""
    (proxy,) = c2.of("proxy")
    assert proxy["kind"] == "socks5" and "stopped" in proxy["error"]


def test_connect_logs_the_authority_and_the_tunnel_is_recognised_again(c2):
    with connect(c2.port) as s:
        s.sendall(b"CONNECT proxied.example:8443 HTTP/1.1\r\nHost: proxied.example:8443\r\n"
                  b"Proxy-Authorization: Basic Ym90OnB3\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        ctx = ssl.create_default_context(cafile=str(c2.ca))
        with ctx.wrap_socket(s, server_hostname="proxied.example") as tls:
            tls.sendall(b"GET /x.txt HTTP/1.1\r\nHost: proxied.example:8443\r\n\r\n")
            assert read_all(tls).endswith(b"\r\n\r\nok\n")
    connect_rec = c2.of("http", 2)[0]
    assert (connect_rec["method"], connect_rec["url"], connect_rec["tunnel"]) == \
        ("CONNECT", "proxied.example:8443", "proxied.example:8443")
    assert ("Proxy-Authorization", "Basic Ym90OnB3") in connect_rec["headers"]
    assert c2.of("http")[1]["url"] == "https://proxied.example:8443/x.txt"


def test_connect_without_a_port_gets_400(c2):
    with connect(c2.port) as s:
        s.sendall(b"CONNECT proxied.example HTTP/1.1\r\nHost: proxied.example\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 400 ")
    (rec,) = c2.of("http")
    assert rec["method"] == "CONNECT" and rec["status"] == 400 and "host:port" in rec["error"]


def test_a_target_address_from_the_dns_pool_is_logged_with_its_name(c2):
    address = c2.resolver.v4.address_for("resolved-first.example")  # the client resolved, then asked the proxy
    with connect(c2.port) as s:
        s.sendall(b"\x04\x01" + struct.pack("!H", 80) + address.packed + b"\0")
        assert recv_exactly(s, 8)[:2] == b"\x00\x5a"
        s.sendall(b"GET / HTTP/1.1\r\nHost: resolved-first.example\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 200 ")
    (proxy,) = c2.of("proxy")
    assert proxy["target"] == f"{address}:80" and proxy["target_name"] == "resolved-first.example"


def test_tunnels_inside_tunnels_stop_at_the_limit(c2):
    hop = b"\x04\x01" + struct.pack("!H", 1080) + socket.inet_aton("192.0.2.1") + b"\0"
    with connect(c2.port) as s:
        s.sendall(hop * (default_tcp.MAX_TUNNELS + 1))
        # Every hop is granted; the one beyond the limit is not served inside.
        assert read_all(s) == (b"\x00\x5a" + hop[2:8]) * (default_tcp.MAX_TUNNELS + 1)
    records = c2.of("proxy", default_tcp.MAX_TUNNELS + 2)
    assert "more than" in records[-1]["error"] and records[-1]["tunnel"] == "192.0.2.1:1080"


def test_connect_where_no_listener_can_tunnel_gets_405():
    stream, records = c2served.Memory(b"CONNECT c2.example:443 HTTP/1.1\r\nHost: c2.example:443\r\n\r\n"), []
    asyncio.run(http.serve(stream, HttpConfig(bodies_dir=""), records.append, {}, "http"))
    assert stream.written.startswith(b"HTTP/1.1 405 ")
    assert records == [dict(event="http", http_version="1.1", method="CONNECT", url="c2.example:443", status=405,
                            headers=[("Host", "c2.example:443")], error="no tunnel here")]


def test_tls_without_sni_inside_a_tunnel_gets_a_leaf_for_the_name_the_proxy_was_given(c2):
    with connect(c2.port) as s:
        socks5_open(s, domain("nosni.example"), 443)
        ctx = ssl.create_default_context(cafile=str(c2.ca))
        ctx.check_hostname = False
        with ctx.wrap_socket(s) as tls:  # no server_hostname: no SNI
            cert = tls.getpeercert()
    assert cert["subjectAltName"] == (("DNS", "nosni.example"),)
    assert "sni" not in c2.of("tls")[0]


def test_socks5_prefers_username_and_password_when_offered_and_refuses_methods_it_does_not_speak(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x05\x02\x00\x02")  # none, or username/password: the password is worth more
        assert recv_exactly(s, 2) == b"\x05\x02"
    with connect(c2.port) as s:
        s.sendall(b"\x05\x01\x01")  # GSSAPI only
        assert read_all(s) == b"\x05\xff"
    errors = sorted(r["error"] for r in c2.of("proxy", 2))  # two conversations: in either order
    assert errors[0] == "no method we speak among [1]" and "stopped" in errors[1]


def test_an_https_proxy_tunnels_tls_inside_tls(c2):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--proxy-cacert", str(c2.ca), "--cacert", str(c2.ca),
                          "-x", f"https://127.0.0.1:{c2.port}", "https://inner.example/a.txt"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr
    outer, inner = c2.of("tls", 2)
    assert "sni" not in outer and inner["sni"] == "inner.example" and inner["tunnel"] == "inner.example:443"
    assert c2.of("http", 2)[1]["url"] == "https://inner.example/a.txt"


def test_a_silent_client_in_a_tunnel_gets_the_protocol_of_the_port_it_asked_the_proxy_for(c2):
    with connect(c2.port) as s:
        socks5_open(s, domain("mx.example"), 25)
        assert s.recv(4096).startswith(b"220 ")  # SMTP speaks first, after the recognition's wait
        s.sendall(b"QUIT\r\n")
        assert b"221" in read_all(s)


def test_a_socks5_address_type_that_does_not_exist_is_logged(c2):
    with connect(c2.port) as s:
        s.sendall(b"\x05\x01\x00")
        assert recv_exactly(s, 2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x09" + b"\0" * 6)
        assert read_all(s) == b""
    assert c2.of("proxy")[0]["error"] == "address type 9: not one of SOCKS5's"
