"""Conversation log records: fields, text form, conntrack retries, DNS names."""

from __future__ import annotations

import io
import ipaddress
import json

from nftdivert.services.conntrack import Entry
from nftdivert.services.convlog import ConversationLog, NewConversation, question_record, record, recycled_record, text_line

V4 = NewConversation(wall_time=1_800_000_000.25, version=4, protocol=6,
                     client=ipaddress.ip_address("192.0.2.2").packed, client_port=40000,
                     local=ipaddress.ip_address("192.0.2.1").packed, original_port=45678,
                     listener_name="tcp-echo", listener_port=1337, indev=1)


def test_record_prefers_conntrack_and_falls_back_to_the_packet():
    original = (ipaddress.ip_address("198.51.100.7").packed, 45678)
    rec = record(V4, original)
    assert rec["original_destination"] == "198.51.100.7:45678"
    assert rec["original_destination_from"] == "conntrack"
    assert rec["client"] == "192.0.2.2:40000" and rec["protocol"] == "tcp"
    assert rec["time"] == "2027-01-15T08:00:00.250Z"
    assert rec["interface"] == "lo"  # ifindex 1
    fallback = record(V4, None)
    assert fallback["original_destination"] == "192.0.2.1:45678"
    assert fallback["original_destination_from"] == "packet"


def test_ipv6_endpoints_are_bracketed_and_text_is_one_line():
    ev = NewConversation(**{**V4.__dict__, "version": 6, "client": ipaddress.ip_address("2001:db8:1::2").packed,
                            "local": ipaddress.ip_address("2001:db8:1::1").packed})
    rec = record(ev, (ipaddress.ip_address("2001:db8:ffff::7").packed, 443), name="c2.example")
    assert rec["client"] == "[2001:db8:1::2]:40000"
    assert rec["original_destination"] == "[2001:db8:ffff::7]:443"
    line = text_line(rec)
    assert "\n" not in line and "c2.example" in line and "tcp-echo" in line


def test_log_thread_retries_conntrack_then_writes_json_lines():
    calls = []

    def lookup(*args):
        calls.append(args)
        return None if len(calls) < 3 else Entry(V4.client, 40000, ipaddress.ip_address("198.51.100.7").packed,
                                                 45678, 1, False)

    out = io.StringIO()
    asked = []

    def name_for(address, when):
        asked.append(when)
        return "x.example" if str(address) == "198.51.100.7" else None

    log = ConversationLog(out, as_json=True, lookup=lookup, name_for=name_for)
    log.submit(V4)
    log.dns_question("192.0.2.2:5353", "x.example", "A", "198.51.100.7")
    log.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(calls) == 3 and calls[0] == (4, 6, V4.client, 40000, V4.local, 45678)
    assert lines[0]["original_destination"] == "198.51.100.7:45678" and lines[0]["name"] == "x.example"
    assert asked == [V4.wall_time]  # the name at the time of the conversation, not at the time of writing
    assert lines[1] == {**lines[1], "event": "dns", "name": "x.example", "answer": "198.51.100.7", "rcode": "NOERROR"}
    assert log.written == 2


def test_the_clients_own_port_comes_from_conntrack_and_a_known_original_needs_no_lookup():
    """Local mode: the kernel remapped the client's port before the worker saw
    it (41000); conntrack's original tuple has the client's own (40000)."""
    calls = []

    def lookup(*args):
        calls.append(args)
        return Entry(V4.client, 40000, ipaddress.ip_address("198.51.100.7").packed, 45678, 1, False)

    out = io.StringIO()
    log = ConversationLog(out, as_json=True, lookup=lookup)
    log.submit(NewConversation(**{**V4.__dict__, "client_port": 41000}))
    learned = (ipaddress.ip_address("198.51.100.91").packed, 4444)
    log.submit(NewConversation(**{**V4.__dict__, "original_port": 4444, "original": learned}))
    log.close()
    first, second = [json.loads(line) for line in out.getvalue().splitlines()]
    assert first["client"] == "192.0.2.2:40000" and calls == [(4, 6, V4.client, 41000, V4.local, 45678)]
    assert second["original_destination"] == "198.51.100.91:4444"
    assert second["original_destination_from"] == "conntrack" and len(calls) == 1


def test_dns_records_in_json_and_text():
    rec = recycled_record(1_800_000_000.5, "198.18.0.9", "dga1.example", "dga300.example")
    assert rec == {"time": "2027-01-15T08:00:00.500Z", "event": "dns_recycled", "address": "198.18.0.9",
                   "old_name": "dga1.example", "new_name": "dga300.example"}
    assert text_line(rec).endswith("pool full: 198.18.0.9 now stands for dga300.example (was dga1.example)")
    nx = question_record("192.0.2.2:5353", "x.blocked.example", "A", "", "NXDOMAIN")
    assert text_line(nx).endswith("asked A x.blocked.example -> NXDOMAIN")
    mx = question_record("192.0.2.2:5353", "corp.example", "MX", "10 mail.corp.example")
    assert text_line(mx).endswith("asked MX corp.example -> 10 mail.corp.example")


def test_the_queue_is_bounded_and_counts_what_it_drops():
    import threading

    entered, gate = threading.Event(), threading.Event()

    def lookup(*_args):
        entered.set()
        gate.wait(10)  # conntrack slower than a flood of new conversations
        return None

    out = io.StringIO()
    log = ConversationLog(out, as_json=True, lookup=lookup, retries=1, limit=8)
    log.submit(V4)
    assert entered.wait(10)  # the first is off the queue, waiting at the gate
    for _ in range(8 + 50):
        log.submit(V4)
    assert log.dropped == 50
    gate.set()
    log.close()
    assert log.written + log.dropped == 59 and log.failed == 0
    assert len(out.getvalue().splitlines()) == log.written


def test_an_event_that_raises_is_counted_and_the_thread_carries_on():
    names = iter([RuntimeError("boom"), "second.example"])

    def name_for(_addr, _when):
        value = next(names)
        if isinstance(value, Exception):
            raise value
        return value

    out = io.StringIO()
    log = ConversationLog(out, as_json=True, name_for=name_for)
    log.submit(V4)
    log.submit(V4)
    log.close()
    assert (log.failed, log.written) == (1, 1)
    assert json.loads(out.getvalue())["name"] == "second.example"


def test_close_gives_up_on_a_stuck_queue():
    import threading
    import time

    gate = threading.Event()
    log = ConversationLog(io.StringIO(), as_json=True, lookup=lambda *_: gate.wait(30) and None,
                          retries=1, limit=2)
    for _ in range(4):
        log.submit(V4)
    t0 = time.monotonic()
    log.close(timeout=0.5)
    assert time.monotonic() - t0 < 5
    gate.set()
    assert log.dropped >= 2


def test_tls_and_http_records_get_one_readable_line_each():
    base = {"time": "2026-01-01T00:00:00.000Z", "client": "192.0.2.5:40000", "listener": "tcp-echo"}
    failed = dict(base, event="tls", sni="c2.example", alpn_offered=["h2", "http/1.1"], client_version="TLSv1.2",
                  result="failed", error="TLSV1_ALERT_UNKNOWN_CA", version=None)
    assert text_line(failed).endswith("sni=c2.example alpn=h2,http/1.1 version=TLSv1.2 failed: TLSV1_ALERT_UNKNOWN_CA")
    req = dict(base, event="http", method="POST", url="https://c2.example/up", status=200, headers=[],
               body_size=5, body_sha256="ab" * 32, body_saved="/b/" + "ab" * 32)
    assert text_line(req).endswith(f"POST https://c2.example/up -> 200, body 5 bytes sha256 abababababababab... "
                                   f"saved /b/{'ab' * 32}")
    assert text_line(dict(base, event="http", error="bad")).endswith("bad request: bad")
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    log.event({k: v for k, v in req.items() if k != "time"})  # the listener's record: stamped on arrival
    log.close()
    written = json.loads(out.getvalue())
    assert list(written)[:2] == ["time", "client"] and written["time"].endswith("Z") and written["status"] == 200
