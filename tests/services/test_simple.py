"""Chargen, QOTD, Finger and Ident answers, and the stream services on a real socket pair."""

from __future__ import annotations

import asyncio
import hashlib

from streams import Stream
from nftdivert.services import simple


def test_chargen_lines_rotate_through_the_printable_characters():
    lines = simple.chargen_lines(0, 96).split(b"\r\n")[:-1]
    assert all(len(line) == 72 for line in lines)
    assert lines[0] == bytes(range(32, 104)) and lines[1] == bytes(range(33, 105))
    assert lines[95] == lines[0]  # 95 characters: the pattern comes round
    assert len(simple.chargen_datagram()) <= 512


def test_quotes_are_short_lines():
    assert all(0 < len(simple.quote(i)) < 512 and simple.quote(i).endswith(b"\r\n") for i in range(10))


def test_finger_answers_a_user_and_the_list():
    assert b"Login: admin" in simple.finger_answer("admin")
    assert b"Login: admin" in simple.finger_answer("/W admin@host.example")
    assert simple.finger_answer("").startswith(b"Login ")
    assert b"<" not in simple.finger_answer("<script>")


def test_ident_answers_a_port_pair_and_refuses_anything_else():
    assert simple.ident_answer("6193, 23") == b"6193, 23 : USERID : UNIX : user\r\n"
    assert simple.ident_answer(" 80 ,40000 ") == b"80, 40000 : USERID : UNIX : user\r\n"
    assert simple.ident_answer("0, 23").endswith(b": ERROR : INVALID-PORT\r\n")
    assert simple.ident_answer("hello").endswith(b": ERROR : INVALID-PORT\r\n")


def test_finger_reads_its_query_across_reads_and_logs_it():
    stream, records = Stream(b"ro", b"ot\r\n"), []
    asyncio.run(simple.serve_query(stream, records.append, {"client": "c"}, "finger"))
    assert records == [{"client": "c", "event": "finger", "query": "root"}]
    assert b"Login: root" in stream.written


def test_discard_answers_nothing_and_logs_size_and_hash():
    stream, records = Stream(b"a" * 1000, b"b" * 10), []
    asyncio.run(simple.serve_discard(stream, records.append, {}))
    assert stream.written == b""
    assert records == [{"event": "discard", "size": 1010, "sha256": hashlib.sha256(b"a" * 1000 + b"b" * 10).hexdigest()}]


def test_chargen_over_a_stream_stops_when_the_client_closes():
    stream, records = Stream(), []  # closed at once

    async def run() -> None:
        await simple.serve_chargen(stream, records.append, {})

    asyncio.run(run())
    assert records == [{"event": "chargen"}] and len(stream.written) < simple.CHARGEN_MAX
