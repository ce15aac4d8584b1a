"""Recognising a protocol from a client's first bytes (pure functions, real ClientHellos)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings, strategies as st

from nftdivert.services import recognize


def client_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight Python's own TLS client sends."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_client_hello_is_tls_and_names_sni_alpn_and_versions():
    hello = client_hello("c2.example", ["h2", "http/1.1"])
    assert recognize.classify(hello) == "tls"
    info = recognize.client_hello(hello)
    assert info["sni"] == "c2.example" and info["alpn_offered"] == ["h2", "http/1.1"]
    assert "TLSv1.3" in info["versions_offered"] and info["client_version"] == "TLSv1.2"


def test_a_client_hello_without_sni_has_none():
    info = recognize.client_hello(client_hello(None))
    assert "sni" not in info and "alpn_offered" not in info


@pytest.mark.parametrize("first, kind", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http"),
    (b"POST /up HTTP/1.0\r\n", "http"),
    (b"GET /\r\n", "other"),  # HTTP/0.9 asks for nothing a web server answers today
    (b"SSH-2.0-OpenSSH_9.2\r\n", "ssh"),  # SSH clients speak first
    (b"\x16\x03\x01\x00", "other"),  # too short to be sure
    (b"\x00\x01\x02", "other"),
    (b"EHLO x\r\n", "smtp"),  # a client that does not wait for the greeting
    (b"HELO x\r\n", "smtp"),
    (b"a1 LOGIN bot pw\r\n", "imap"),
    (b"A001 CAPABILITY\r\n", "imap"),
    (b"CAPA\r\n", "pop3"),
    (b"USER x\r\n", "ftp"),  # FTP or POP3: without a port, FTP
    (b"AUTH TLS\r\n", "ftp"),
    (b"hello world\r\n", "other"),
    (b"QUIT\r\n", "other"),
])
def test_classify(first, kind):
    assert recognize.classify(first) == kind


@pytest.mark.parametrize("first, port, kind", [
    (b"USER x\r\n", 110, "pop3"),
    (b"USER x\r\n", 21, "ftp"),
    (b"USER x\r\n", 25, "ftp"),  # not an SMTP command: the port cannot make it one
    (b"EHLO x\r\n", 21, "smtp"),
    (b"AUTH PLAIN\r\n", 995, "pop3"),
])
def test_the_port_settles_a_command_two_protocols_share(first, port, kind):
    assert recognize.classify(first, port) == kind


def test_a_silent_client_is_greeted_on_plain_server_first_ports_only():
    assert all(recognize.greets(p) for p in (21, 22, 25, 110, 143, 587, 2525))
    assert not any(recognize.greets(p) for p in (465, 990, 993, 995, 443, 8080, None))
    assert recognize.server_first(993) == "imap" and recognize.server_first(995) == "pop3"


@pytest.mark.parametrize("first, more", [
    (b"\x16\x03", True),  # a TLS record header, cut short
    (b"GE", True),
    (b"GET /index.ht", True),  # the request line is not complete yet
    (b"GET / HTTP/1.1\r\n", False),
    (b"\x00\x01", False),  # nothing it could still become
    (b"hello world", False),
    (b"A" * recognize.PEEK_BYTES, False),  # the bound
])
def test_wants_more_only_while_the_answer_could_change(first, more):
    assert recognize.wants_more(first) is more


def test_silent_clients_get_the_protocol_that_speaks_first_on_the_port_they_asked_for():
    assert [recognize.server_first(p) for p in (25, 465, 587, 2525, 21, 22, 110, 143)] == \
        ["smtp"] * 4 + ["ftp", "ssh", "pop3", "imap"]
    assert recognize.server_first(4444) is None and recognize.server_first(None) is None


@settings(deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_without_raising(data):
    recognize.client_hello(b"\x16\x03\x01" + data)
    recognize.classify(data)


def test_a_cut_client_hello_never_raises():
    hello = client_hello("cut.example", ["http/1.1"])
    for cut in range(len(hello)):
        info = recognize.client_hello(hello[:cut])
        assert "cut.example".startswith(info.get("sni", ""))
    assert recognize.client_hello(hello)["sni"] == "cut.example"


@pytest.mark.parametrize("first, port, inside, kind", [
    (b"", 25, False, "smtp"),  # silent on a port that greets
    (b"", 993, False, "other"),  # implicit TLS: the ClientHello comes first
    (b"", 993, True, "imap"),
    (b"\r\n\r\n", 21, False, "ftp"),  # a scanner's probe: the port's protocol, not the echo
    (b"GET / HTTP/1.0\r\n\r\n", 110, False, "pop3"),
    (b"GET / HTTP/1.0\r\n\r\n", 995, True, "pop3"),
    (b"GET / HTTP/1.0\r\n\r\n", 8080, False, "http"),
    (b"EHLO x\r\n", 143, False, "smtp"),  # another server-first protocol's own command
    (b"\r\n\r\n", 4444, False, "other"),
    (b"", None, False, "other"),
])
def test_choose(first, port, inside, kind):
    assert recognize.choose(first, port, inside) == kind


@pytest.mark.parametrize("first, kind", [
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2c"),  # the HTTP/2 preface (prior knowledge, or inside TLS)
    (b"\x05\x01\x00", "socks5"),
    (b"\x05\x02\x00\x02", "socks5"),
    (b"\x05\x02\x00", "other"),  # fewer methods than it says: not a greeting
    (b"\x04\x01\x01\xbb\xc0\x00\x02\x01\x00", "socks4"),
    (b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00c2.example\x00", "socks4"),  # 4a: the name after the user id
    (b"\x04\x02\x00\x50\xc0\x00\x02\x01\x00", "other"),  # BIND: no one's C2 channel
    (b"CONNECT c2.example:443 HTTP/1.1\r\n", "http"),  # CONNECT is HTTP's to answer
])
def test_classify_c2_transports(first, kind):
    assert recognize.classify(first) == kind


@pytest.mark.parametrize("first, more", [
    (b"\x05", True),
    (b"\x05\x02\x00", True),  # one of the two methods still to come
    (b"\x05\x01\x00", False),
    (b"\x04\x01\x01\xbb", True),
    (b"\x04\x01\x01\xbb\xc0\x00\x02\x01user", True),  # the user id ends with a NUL
    (b"\x04\x01\x01\xbb\xc0\x00\x02\x01\x00", False),
])
def test_wants_more_reads_a_whole_socks_greeting(first, more):
    assert recognize.wants_more(first) is more
