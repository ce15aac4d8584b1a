"""The TCP listener's recognition on real loopback sockets: TLS, the echo inside it, silent clients."""

from __future__ import annotations

import os
import socket
import ssl
import time

import pytest

from nftdivert.config import PROTOCOL_KINDS, Listener, RecognizeConfig, TlsConfig
from nftdivert.services import recognize
from nftdivert.services.answers import ANSWERS
from nftdivert.services.default_tcp import C2
from nftdivert.services.listeners import Listeners


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


@pytest.fixture
def listening(tmp_path):
    port, records = free_port(), []
    lst = Listeners((Listener("t", "tcp", port),), tls=TlsConfig(state_dir=str(tmp_path / "state")),
                    recognize=RecognizeConfig(wait=0.3), on_event=records.append)
    lst.start()
    try:
        yield port, records, tmp_path / "state" / "ca.pem"
    finally:
        lst.stop()


def test_bytes_inside_tls_that_are_not_http_are_echoed_in_tls(listening):
    port, records, ca = listening
    assert not ca.exists()  # the CA is made on the first handshake, not before
    untrusted = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
        untrusted.wrap_socket(raw, server_hostname="first.example")
    assert ca.exists()
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="echo.example") as tls:
            tls.sendall(b"\x00\x01binary inside")
            assert tls.recv(100) == b"\x00\x01binary inside"
    assert [(r["sni"], r["result"]) for r in records if r["event"] == "tls"] == [
        ("first.example", "failed"), ("echo.example", "ok")]


def test_a_client_silent_past_the_wait_is_still_recognised_by_what_it_says_first(listening):
    port, records, _ = listening
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        time.sleep(0.6)  # past the wait; no port asked for that greets (nothing names one on loopback)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK")
    assert records[0]["url"] == "http://x/"


def test_a_client_silent_past_the_wait_saying_something_unknown_gets_the_echo(listening):
    port, records, _ = listening
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        time.sleep(0.6)
        s.sendall(b"late words")
        assert s.recv(100) == b"late words"
    assert records == []


def test_a_client_that_talks_first_in_smtp_gets_the_greeting_then_its_answer(listening):
    port, records, _ = listening
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"EHLO fast\r\n")
        got = b""
        while b"250 " not in got:
            got += s.recv(4096)
    assert got.startswith(b"220 ") and b"250-" in got and b"EHLO fast" not in got


def test_tls_ends_with_close_notify_and_fin(listening):
    port, _, ca = listening
    ctx = ssl.create_default_context(cafile=str(ca) if ca.exists() else None)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        tls = ctx.wrap_socket(raw, server_hostname="end.example", suppress_ragged_eofs=False)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: end.example\r\n\r\n")
        got = b""
        while chunk := tls.recv(4096):  # b"" only on the server's close_notify (else SSLEOFError)
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 OK")
        plain = tls.unwrap()  # our close_notify; the server reads it, then its FIN arrives
        assert plain.recv(10) == b""


def test_a_request_line_in_pieces_is_still_http(listening):
    port, records, _ = listening
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GE")
        time.sleep(0.1)
        s.sendall(b"T /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200 OK")
    assert records[0]["url"] == "http://x/a.txt"


def test_without_a_usable_state_dir_tls_is_logged_and_closed(tmp_path):
    state = tmp_path / "theirs"
    state.mkdir()
    os.chown(state, 65534, 65534)
    port, records = free_port(), []
    lst = Listeners((Listener("t", "tcp", port),), tls=TlsConfig(state_dir=str(state)), on_event=records.append)
    lst.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, pytest.raises((ssl.SSLError, OSError)):
            ssl.create_default_context().wrap_socket(raw, server_hostname="x.example")
    finally:
        lst.stop()
    assert records[0]["event"] == "tls" and records[0]["result"] == "failed" and "owned by uid 65534" in records[0]["error"]


def test_every_protocol_recognised_or_fixed_has_a_service():
    """What recognition can name, or a listener's kind fixes, is served (TLS is unwrapped, then named again)."""
    named = {"http", *C2, *recognize.SERVER_FIRST.values(), *PROTOCOL_KINDS} - {"https"}
    assert named == set(ANSWERS)


def test_a_conversation_keeps_the_profile_it_began_with_and_its_records_name_it(tmp_path):
    import asyncio

    from nftdivert.config import HttpConfig, load
    from nftdivert.profiles import Profiles
    from nftdivert.services import custom
    from nftdivert.services.default_tcp import DefaultTcp

    def served(name: str, body: str):
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[[profiles]]\nname = "{name}"\nclients = ["127.0.0.0/8"]\n'
                        f'http = {{ body = "{body}", bodies_dir = "" }}\n')
        return custom.serving(Profiles(load(path)))

    records: list[dict] = []
    answers = DefaultTcp("t", HttpConfig(body="top-level", bodies_dir=""),
                         TlsConfig(state_dir=str(tmp_path / "state")), RecognizeConfig(wait=0.3), records.append)
    old, new = served("lab", "before"), served("lab-renamed", "after")

    def reloading(client: str):  # a reload lands just after the conversation chose its answers
        answers.reload(new)
        return old(client)

    answers.reload(reloading)

    async def ask() -> bytes:
        async def handle(reader, writer):
            try:
                await answers.serve(reader, writer, lambda _n: None)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await reader.read()
            writer.close()
            return reply

    assert asyncio.run(ask()).endswith(b"before")
    assert asyncio.run(ask()).endswith(b"after")
    assert [(r["event"], r.get("profile")) for r in records] == [("http", "lab"), ("http", "lab-renamed")]
