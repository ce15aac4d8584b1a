"""HTTP/2 on real loopback sockets (h2 as the client): h2c prior knowledge and ALPN h2 over TLS."""

from __future__ import annotations

import hashlib
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import pytest

import c2served
from c2served import BIG
from nftdivert.config import HttpConfig, Listener
from nftdivert.services import payloads
from nftdivert.services.listeners import Listeners


c2 = pytest.fixture(c2served.served, name="c2")


def exchange(sock, requests: list[tuple[list, bytes]]) -> dict[int, tuple[dict, bytes]]:
    """Send every request at once (concurrent streams); each stream's headers and body, once all ended."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    answers: dict[int, tuple[dict, bytes]] = {}
    for headers, body in requests:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers, end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)
        answers[sid] = ({}, b"")
    sock.sendall(conn.data_to_send())
    ended = set()
    while len(ended) < len(requests):
        data = sock.recv(65536)
        assert data, "closed before every stream ended"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                answers[event.stream_id] = (dict(event.headers), b"")
            elif isinstance(event, h2.events.DataReceived):
                head, body = answers[event.stream_id]
                answers[event.stream_id] = (head, body + event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                ended.add(event.stream_id)
        sock.sendall(conn.data_to_send())
    return answers


def get(path: str, authority: str = "c2.example", method: str = "GET", scheme: str = "http") -> list:
    return [(":method", method), (":path", path), (":scheme", scheme), (":authority", authority)]


def test_h2c_streams_are_answered_and_logged_like_http_1_1(c2):
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as s:
        answers = exchange(s, [(get("/a.json"), b""), (get("/big"), b""), (get("/s.exe", method="HEAD"), b""),
                               (get("/up", method="POST") + [("content-type", "text/plain")], b"loot" * 1000),
                               (get("/kept"), b"")])
    (a, a_body), (big, big_body), (head, head_body), (up, _), (kept, kept_body) = answers.values()
    # A rule's HTTP/1.1-only header is left out (h2 refuses TE but "trailers"), the rest of its answer kept.
    assert "te" not in kept and kept["x-id"] == "7" and kept_body == b"k"
    assert a[":status"] == "200" and a["content-type"] == "application/json" and a_body == b"{}\n"
    assert big_body == BIG  # 300 kB through a 64 kB window: sent as the client took it
    assert head["content-length"] == str(len(payloads.pe())) and head_body == b""  # HEAD: the size, no body
    assert up[":status"] == "200"
    records = {r["url"]: r for r in c2.of("http", 5)}
    assert set(records) == {"http://c2.example/a.json", "http://c2.example/big", "http://c2.example/s.exe",
                            "http://c2.example/up", "http://c2.example/kept"}
    assert all(r["http_version"] == "2" for r in records.values())
    post = records["http://c2.example/up"]
    assert post["method"] == "POST" and post["body_size"] == 4000
    assert post["body_sha256"] == hashlib.sha256(b"loot" * 1000).hexdigest()
    assert (":authority", "c2.example") in post["headers"]


def test_alpn_h2_over_tls_is_http2_inside(c2):
    ctx = ssl.create_default_context(cafile=str(c2.ca))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="h2.example") as s:
            assert s.selected_alpn_protocol() == "h2"
            ((head, body),) = exchange(s, [(get("/x.txt", "h2.example", scheme="https"), b"")]).values()
    assert head[":status"] == "200" and body == b"ok\n"
    (rec,) = c2.of("http")
    assert rec["url"] == "https://h2.example/x.txt" and rec["http_version"] == "2"
    assert c2.of("tls")[0]["alpn"] == "h2"


def test_a_client_that_offers_only_http_1_1_still_gets_it(c2):
    ctx = ssl.create_default_context(cafile=str(c2.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="old.example") as s:
            assert s.selected_alpn_protocol() == "http/1.1"
            s.sendall(b"GET /x.txt HTTP/1.1\r\nHost: old.example\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    assert c2.of("http")[0]["http_version"] == "1.1"


def test_garbage_after_the_preface_is_logged_as_a_protocol_error(c2):
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")  # DATA on stream 0
        while s.recv(65536):
            pass
    (rec,) = c2.of("http")
    assert rec["http_version"] == "2" and rec["error"]


def test_an_http_1_1_upgrade_to_h2c_is_answered_on_stream_1_and_the_connection_goes_on_in_http2(c2):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    settings = conn.initiate_upgrade_connection()
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as s:
        s.sendall(b"GET /u.txt HTTP/1.1\r\nHost: up.example\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)
        assert head.startswith(b"HTTP/1.1 101 ") and b"Upgrade: h2c" in head
        conn.send_headers(3, get("/n.json", "up.example"), end_stream=True)  # the next request: HTTP/2 from the start
        s.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {1: b"", 3: b""}
        ended: set[int] = set()
        while ended != {1, 3}:
            data = s.recv(65536)
            assert data, "closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            s.sendall(conn.data_to_send())
    assert bodies == {1: b"ok\n", 3: b"{}\n"}
    upgrade, second = c2.of("http", 2)
    assert (upgrade["http_version"], upgrade["upgrade"], upgrade["url"]) == ("1.1", "h2c", "http://up.example/u.txt")
    assert (second["http_version"], second["url"]) == ("2", "http://up.example/n.json")


def test_a_listener_of_kind_http_speaks_h2c_too():
    port = c2served.free_port()
    records: list = []
    lst = Listeners((Listener("web", "tcp", port, kind="http"),), http=HttpConfig(bodies_dir=""),
                    on_event=records.append)
    lst.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            ((head, body),) = exchange(s, [(get("/k.txt"), b"")]).values()
    finally:
        lst.stop()
    assert head[":status"] == "200" and body == b"ok\n"
    assert records[0]["http_version"] == "2" and records[0]["listener"] == "web"


def test_a_connect_stream_is_a_tunnel_into_our_answers(c2):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "inner.example:80")])
    got, status, ended = b"", None, False
    with socket.create_connection(("127.0.0.1", c2.port), timeout=5) as s:
        s.sendall(conn.data_to_send())
        while not ended:
            data = s.recv(65536)
            assert data, "closed"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[":status"]
                    conn.send_data(1, b"GET /t.json HTTP/1.1\r\nHost: inner.example\r\n\r\n")  # inside the tunnel
                elif isinstance(event, h2.events.DataReceived):
                    got += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            s.sendall(conn.data_to_send())
    assert status == "200" and got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"\r\n\r\n{}\n")
    connect, inside = c2.of("http", 2)
    assert (connect["method"], connect["http_version"], connect["tunnel"]) == ("CONNECT", "2", "inner.example:80")
    assert inside["url"] == "http://inner.example/t.json" and inside["tunnel"] == "inner.example:80"
