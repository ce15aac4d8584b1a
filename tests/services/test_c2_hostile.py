"""Any bytes after a C2 transport's first words end the conversation quietly: no exception escapes."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import hpack
from hypothesis import given, settings, strategies as st

from c2served import Memory
from nftdivert.config import DnsConfig, HttpConfig, HttpRule, RecognizeConfig, TlsConfig
from nftdivert.services import doh, http, http2, proxy
from nftdivert.services.default_tcp import DefaultTcp
from nftdivert.services.dns import Resolver

CFG = HttpConfig(bodies_dir="", rules=(HttpRule(host="*", path="/ws", body="task"),))
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: c2.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def served(coroutine) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 10))


@settings(deadline=None, max_examples=150)
@given(st.sampled_from([b"\x05\x01\x00", b"\x05\x01\x02", b"\x04\x01\x00\x50\x00\x00\x00\x01"]), st.binary(max_size=300))
def test_socks(greeting, rest):
    records: list = []
    served(proxy.serve_socks("socks5" if greeting[0] == 5 else "socks4", Memory(greeting + rest), records.append, {},
                             http.Transports()))
    assert len(records) == 1


@settings(deadline=None, max_examples=150)
@given(st.binary(max_size=600))
def test_http2(rest):
    served(http2.serve(Memory(PREFACE + rest), CFG, lambda _r: None, {}, "http"))


@settings(deadline=None, max_examples=150)
@given(st.binary(max_size=600))
def test_websocket(rest):
    stream = Memory(UPGRADE + rest)
    served(http.serve(stream, CFG, lambda _r: None, {}, "http"))
    assert stream.written.startswith(b"HTTP/1.1 101 ")


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


# Frames of every type, well framed: what passes the framing reaches h2's state machine.
FRAMES = st.lists(st.builds(h2_frame, st.integers(0, 10), st.integers(0, 255), st.integers(0, 5),
                            st.binary(max_size=40)), max_size=8)
HEADERS = h2_frame(1, 5, 1, bytes([0x82, 0x86, 0x84, 0x41, 0x0a]) + b"c2.example")  # GET http / c2.example, ended


@settings(deadline=None, max_examples=300)
@given(FRAMES, st.booleans())
def test_http2_frames(frames, request_first):
    settings_frame = h2_frame(4, 0, 0, b"")
    data = PREFACE + settings_frame + (HEADERS if request_first else b"") + b"".join(frames)
    served(http2.serve(Memory(data), CFG, lambda _r: None, {}, "http"))


def ws_frame(first: int, payload: bytes, mask: bytes) -> bytes:
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([first, 0x80 | len(payload)]) + mask + masked


@settings(deadline=None, max_examples=300)
@given(st.lists(st.builds(ws_frame, st.integers(0, 255), st.binary(max_size=60), st.binary(min_size=4, max_size=4)),
                max_size=8))
def test_websocket_frames(frames):
    stream = Memory(UPGRADE + b"".join(frames))
    served(http.serve(stream, CFG, lambda _r: None, {}, "http"))


@settings(deadline=None, max_examples=150)
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=!", max_size=40),
       st.binary(max_size=200))
def test_h2c_upgrade_with_any_settings(settings_header, rest):
    stream = Memory(b"GET / HTTP/1.1\r\nHost: c2.example\r\nUpgrade: h2c\r\nHTTP2-Settings: "
                    + settings_header.encode() + b"\r\n\r\n" + rest)
    served(http.serve(stream, CFG, lambda _r: None, {}, "http"))


RESOLVER = Resolver.from_config(DnsConfig())


@settings(deadline=None, max_examples=300)
@given(st.text(max_size=80), st.text(max_size=12))
def test_json_doh_with_any_name_and_type(name, qtype):
    target = "/resolve?" + urllib.parse.urlencode({"name": name, "type": qtype})
    got = doh.answer(RESOLVER, "GET", target, [], b"", "192.0.2.1:1")
    if name:  # an empty name is no question: the ordinary answer
        assert got[0] in (200, 400) and json.loads(got[2])["Status"] in range(0, 24)


def connect_headers(authority: str) -> bytes:
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
    return h2_frame(1, 4, 1, block)  # END_HEADERS, and the stream stays open: a tunnel


@settings(deadline=None, max_examples=100)
@given(st.sampled_from(["inner.example:80", "inner.example:443", "[2001:db8::1]:25", "nohost"]),
       st.lists(st.binary(max_size=60), max_size=6), st.booleans())
def test_http2_connect_streams_with_any_bytes_inside(tmp_path_factory, authority, chunks, end):
    answers = DefaultTcp("t", CFG, TlsConfig(state_dir=str(tmp_path_factory.getbasetemp() / "state")),
                         RecognizeConfig(wait=0.05), None)
    transports = answers._transports(("192.0.2.1", 1), ("192.0.2.2", 2))
    frames = b"".join(h2_frame(0, 1 if end and i == len(chunks) - 1 else 0, 1, c) for i, c in enumerate(chunks))
    data = PREFACE + h2_frame(4, 0, 0, b"") + connect_headers(authority) + frames
    served(http2.serve(Memory(data), CFG, lambda _r: None, {}, "http", transports))
