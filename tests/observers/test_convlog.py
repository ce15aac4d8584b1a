"""The conversation log's writer: JSON Lines and text, a bounded queue, failures counted."""

from __future__ import annotations

import io
import json
import threading
import time

from nftdivert.observers import convlog
from nftdivert.observers.convlog import ConversationLog, question_record, recycled_record, text_line
from nftdivert.observers.convrecords import SCHEMA

START = {"v": 1, "time": "2027-01-15T08:00:00.250Z", "event": "start", "id": 7, "protocol": "tcp",
         "client": "192.0.2.2:40000", "original_destination": "198.51.100.7:45678", "name": "c2.example",
         "listener": "tcp-echo", "listener_port": 1337, "interface": "eth1",
         "process": {"pid": 12, "host_pid": 4012, "command": "curl http://c2.example/", "uid": 1000}}
END = {"v": 1, "time": "2027-01-15T08:00:03.750Z", "event": "end", "id": 7, "protocol": "icmp",
       "client": "192.0.2.2", "original_destination": "198.51.100.7", "icmp": {"type": 8, "code": 0, "id": 3},
       "listener": "kernel", "interface": "eth1", "duration": 3.5,
       "sent": {"packets": 1, "bytes": 84}, "received": None, "ended": "timeout"}


def test_records_are_written_as_json_lines_in_order():
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    log.put(START)
    log.dns_question("192.0.2.2:5353", "x.example", "A", "198.18.0.1")
    log.put(END)
    log.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] == START and lines[2] == END
    assert lines[1] == {**lines[1], "v": 1, "event": "dns", "name": "x.example", "answer": "198.18.0.1"}
    assert (log.written, log.dropped, log.failed) == (3, 0, 0)


def test_text_lines_are_one_line_each_and_say_what_matters():
    start = text_line(START)
    assert start.startswith("08:00:00.250  start  tcp") and "\n" not in start
    assert "198.51.100.7:45678" in start and "(c2.example)" in start and "tcp-echo (:1337) via eth1" in start
    assert "pid 12 curl" in start
    end = text_line(END)
    assert "end" in end and "type 8/0" in end and "timeout: 1 pkt 84 B out, ? in, 3.500 s" in end


def test_dns_records_in_json_and_text():
    rec = recycled_record(1_800_000_000.5, "198.18.0.9", "dga1.example", "dga300.example")
    assert rec == {"v": 1, "time": "2027-01-15T08:00:00.500Z", "event": "dns_recycled", "address": "198.18.0.9",
                   "old_name": "dga1.example", "new_name": "dga300.example"}
    assert text_line(rec).endswith("pool full: 198.18.0.9 now stands for dga300.example (was dga1.example)")
    nx = question_record("192.0.2.2:5353", "x.blocked.example", "A", "", "NXDOMAIN")
    assert text_line(nx).endswith("asked A x.blocked.example -> NXDOMAIN")
    mx = question_record("192.0.2.2:5353", "corp.example", "MX", "10 mail.corp.example")
    assert text_line(mx).endswith("asked MX corp.example -> 10 mail.corp.example")
    profiled = question_record("192.0.2.2:5353", "c2.example", "A", "198.51.100.80", profile="sinkhole")
    assert list(profiled)[4:7] == ["client_address", "profile", "name"] and "profile" not in mx


def test_a_start_of_a_profiled_client_says_its_profile():
    assert text_line({**START, "profile": "sinkhole"}).endswith("curl http://c2.example/ profile sinkhole")
    assert "profile" not in text_line(START)


class _Stuck(io.StringIO):
    """A log target slower than a flood of conversations."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.gate.wait(30)
        return super().write(text)


class _Slow(io.StringIO):
    """A target that takes a millisecond a write: slower than a burst comes in, never stuck."""

    def write(self, text: str) -> int:
        time.sleep(0.001)
        return super().write(text)


def test_a_burst_larger_than_the_queue_waits_for_the_writer_and_loses_nothing():
    # Before: put() dropped whatever found the queue full: the ends of a stop in a lab of
    # fifty clients (22,000 at once) lost a third of them.
    out = _Slow()
    log = ConversationLog(out, as_json=True, limit=8)
    for _ in range(200):
        log.put(START)
    log.close()
    assert (log.written, log.dropped) == (200, 0)


def test_the_queue_is_bounded_and_counts_what_it_drops(monkeypatch):
    monkeypatch.setattr(convlog, "PUT_WAIT", 0.01)  # a writer stuck for good: each put waits that long
    out = _Stuck()
    log = ConversationLog(out, as_json=True, limit=8)
    log.put(START)
    assert out.entered.wait(10)  # the first is off the queue, waiting at the gate
    for _ in range(8 + 50):
        log.put(START)
    assert log.dropped == 50
    out.gate.set()
    log.close()
    assert log.written + log.dropped == 59 and log.failed == 0
    assert len(out.getvalue().splitlines()) == log.written


def test_a_record_that_cannot_be_written_is_counted_and_the_thread_carries_on():
    out = io.StringIO()
    log = ConversationLog(out, as_json=False)
    log.put({"event": "start"})  # no fields: its text line cannot be made
    log.put(START)
    log.close()
    assert (log.failed, log.written) == (1, 1)
    assert "c2.example" in out.getvalue()


def test_close_gives_up_on_a_stuck_queue(monkeypatch):
    monkeypatch.setattr(convlog, "PUT_WAIT", 0.01)
    out = _Stuck()
    log = ConversationLog(out, as_json=True, limit=2)
    for _ in range(4):
        log.put(START)
    t0 = time.monotonic()
    log.close(timeout=0.5)
    assert time.monotonic() - t0 < 5
    out.gate.set()
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
    assert list(written)[:3] == ["v", "time", "client"] and written["time"].endswith("Z") and written["status"] == 200
    assert written["v"] == SCHEMA


def test_server_first_records_have_text_lines():
    base = {"v": 1, "time": "2026-11-28T05:00:00.000Z", "client": "192.0.2.2:40000", "listener": "tcp-echo",
            "original_destination": "203.0.113.9:25"}
    mail = dict(base, event="smtp", helo="x", mail_from="a@b.example", rcpt_to=["c@d.example", "e@f.example"],
                headers=[], size=12, sha256="ab" * 32, saved="/m/x.eml")
    assert text_line(mail).endswith(
        "smtp          192.0.2.2:40000 mail from a@b.example to c@d.example,e@f.example, 12 bytes"
        f" sha256 {'ab' * 8}... saved /m/x.eml")
    for event in ("pop3", "imap", "ftp", "smtp_auth"):
        assert text_line(dict(base, event=event, user="u", password="p w")).endswith("login 'u' password 'p w'")
    upload = dict(base, event="ftp_upload", user="u", name="a.zip", size=3, sha256="cd" * 32)
    assert text_line(upload).endswith(f"upload 'a.zip', 3 bytes sha256 {'cd' * 8}...")
    ssh = dict(base, event="ssh", client_version="SSH-2.0-x", logins=[{"user": "root", "password": "toor"}])
    assert text_line(ssh).endswith("SSH-2.0-x, 1 logins 'root'/'toor'")


def test_a_listener_record_is_written_after_its_conversations_start():
    out = io.StringIO()
    log = ConversationLog(out, as_json=False)
    # The listener's process is quicker than the observer's: its record arrives first.
    log.event({"event": "tls", "client": START["client"], "client_address": "192.0.2.2", "listener": "tcp-echo",
               "original_destination": START["original_destination"], "sni": "c2.example", "result": "ok",
               "version": "TLSv1.3"})
    log.put({**START, "time": "2020-01-01T00:00:00.000Z"})  # conntrack's stamp: before the handshake
    log.close()
    events = [line.split()[1] for line in out.getvalue().splitlines()]
    assert events == ["start", "tls"], out.getvalue()


def test_drain_writes_what_waits_for_a_start_that_will_not_come():
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    log.dns_question("192.0.2.2:5353", "x.example", "A", "198.18.0.1")  # to our own address: no start
    log.drain(timeout=10)
    (rec,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rec["client"] == "192.0.2.2:5353" and rec["client_address"] == "192.0.2.2"
    assert log.written == 1
    log.close()


def test_with_no_target_nothing_is_counted_as_written():
    log = ConversationLog(None, as_json=True)
    log.put(START)
    log.dns_question("192.0.2.2:5353", "x.example", "A", "198.18.0.1")
    log.drain(timeout=10)
    log.close()
    assert (log.written, log.dropped, log.failed) == (0, 0, 0)


def test_a_question_names_its_client_address_without_the_port():
    assert question_record("[2001:db8:1::2]:5353", "x.example", "AAAA", "")["client_address"] == "2001:db8:1::2"


class _Full(io.StringIO):
    """A target that takes `room` characters, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, text: str) -> int:
        if self.tell() + len(text) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(text)


def test_a_target_that_fails_is_said_once_and_written_no_more():
    # Before: each record failed on its own, counted only, and nobody heard of it.
    out = _Full(room=len(json.dumps(START)) + 1)
    log = ConversationLog(out, as_json=True)
    heard = []
    log.on_error = heard.append
    for _ in range(3):
        log.put(START)
    log.close()
    assert (log.written, log.failed) == (1, 2)
    assert [e.strerror for e in heard] == ["No space left on device"] and log.error is heard[0]
    assert out.getvalue() == json.dumps(START) + "\n"



def test_small_service_records_have_text_lines():
    base = {"v": 1, "time": "2026-12-06T04:17:53.068Z", "client": "192.0.2.2:40000", "listener": "udp-echo",
            "original_destination": "198.51.100.1:123"}
    assert text_line(dict(base, event="ntp", answered=True)).endswith("192.0.2.2:40000 -> 198.51.100.1:123 answered")
    assert text_line(dict(base, event="time")).endswith("-> 198.51.100.1:123 answered")
    assert text_line(dict(base, event="syslog", severity="notice", message="hi")).endswith("notice: 'hi'")
    assert text_line(dict(base, event="tftp", operation="read", file="a.pdf", size=3)).endswith(
        "read 'a.pdf', 3 bytes served")
    assert text_line(dict(base, event="tftp", operation="write", file="x", size=3, sha256="ab" * 32)).endswith(
        f"write 'x', 3 bytes sha256 {'ab' * 8}...")
    assert text_line(dict(base, event="irc", command="JOIN", nick="bot", channel="#c", key="k")).endswith(
        "bot joins #c key 'k'")
    assert text_line(dict(base, event="irc", command="PRIVMSG", nick="bot", target="#c", text="go")).endswith(
        "bot PRIVMSG #c: 'go'")
    assert text_line(dict(base, event="discard", size=2, sha256="cd" * 32)).endswith(f"discarded 2 bytes sha256 {'cd' * 8}...")
    assert text_line(dict(base, event="finger", query="root")).endswith("query 'root'")
    assert text_line(dict(base, event="irc", command="register", nick="b", user="u")).endswith(
        "register nick 'b' user 'u'")


def test_c2_transport_records_have_text_lines():
    base = {"time": "2026-01-01T00:00:00.000Z", "client": "192.0.2.5:40000", "listener": "tcp-echo"}
    connect = dict(base, event="http", method="CONNECT", url="c2.example:443", status=200, headers=[],
                   tunnel="c2.example:443")
    assert text_line(connect).endswith("CONNECT c2.example:443 -> 200, tunnel")
    h2 = dict(base, event="http", http_version="2", method="GET", url="https://c2.example/", status=200,
              headers=[], body_size=0, body_sha256="ab" * 32)
    assert "GET https://c2.example/ HTTP/2 -> 200, body 0 bytes" in text_line(h2)
    proxy = dict(base, event="proxy", kind="socks5", command="connect", target="c2.example:443")
    assert text_line(proxy).endswith("socks5 connect c2.example:443")
    cut = dict(base, event="proxy", kind="socks4", error="the client stopped")
    assert text_line(cut).endswith("socks4 the client stopped")
    assert text_line(dict(base, event="proxy", error="more than 8")).endswith("more than 8")
    frame = dict(base, event="websocket", opcode="text", size=5, sha256="cd" * 32, head="68", answered="echo")
    assert text_line(frame).endswith("text message 5 bytes sha256 cdcdcdcdcdcdcdcd... echo")


def test_every_record_written_is_shipped_as_json_under_the_schema_asked_for():
    out, shipped = io.StringIO(), []
    log = ConversationLog(out, as_json=False, schema=lambda rec: {"mapped": rec["event"]},
                          ship=lambda text, rec: shipped.append((text, rec["event"])))
    log.put(START)
    log.put(END)
    log.close()
    assert out.getvalue().startswith("08:00:00.250  start  tcp")  # the text log keeps our names
    assert shipped == [('{"mapped": "start"}', "start"), ('{"mapped": "end"}', "end")]
    assert log.written == 2


def test_without_a_file_records_are_still_shipped():
    shipped = []
    log = ConversationLog(None, as_json=True, ship=lambda text, rec: shipped.append(json.loads(text)))
    log.put(START)
    log.close()
    assert shipped == [START] and log.written == 1


def test_analyses_records_have_text_lines_and_listener_records_get_their_clients_task():
    assert text_line({**START, "task": "4711"}).endswith(" task 4711")
    line = text_line({"v": 1, "time": "2027-01-15T08:00:00.250Z", "event": "task", "task": "4711", "action": "start",
                      "clients": ["10.0.1.23/32"]})
    assert line == "08:00:00.250  task   4711 start 10.0.1.23/32"
    refused = text_line({"v": 1, "time": "2027-01-15T08:00:00.250Z", "event": "task", "action": "refused",
                         "error": "analyses.file = ''"})
    assert refused == "08:00:00.250  task   analyses file refused analyses.file = ''"
    out, routed = io.StringIO(), []
    log = ConversationLog(out, as_json=True)
    log.tasks = lambda address, _when: "4711" if address == "192.0.2.2" else None
    log.route = routed.append
    log.dns_question("192.0.2.2:5353", "x.example", "A", "198.18.0.1")
    log.dns_question("192.0.2.3:5353", "y.example", "A", "198.18.0.2")
    log.put({**START, "client_address": "192.0.2.2"})  # a start is tagged by the observer, by its start time
    log.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("task") for r in lines] == ["4711", None, None]
    assert list(lines[0]).index("task") == list(lines[0]).index("client_address") + 1
    assert routed == [lines[0]]


def test_a_listener_record_takes_its_conversations_task_though_the_address_went_to_another():
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    log.tasks = lambda _address, _when: "later"  # the address belongs to another task by now
    http = {"event": "http", "client": "192.0.2.2:40000", "client_address": "192.0.2.2", "method": "GET"}
    log.put({**START, "client_address": "192.0.2.2", "task": "earlier"})
    log.event(http)  # of the earlier task's conversation
    log.put({**START, "client": "192.0.2.2:40001", "client_address": "192.0.2.2"})  # began in no task
    log.event({**http, "client": "192.0.2.2:40001"})
    log.put({**END, "client": "192.0.2.2:40000"})
    log.event(http)  # no conversation of its own any more: its client's task now
    log.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["event"], r.get("task")) for r in lines] == [("start", "earlier"), ("http", "earlier"), ("start", None),
                                                            ("http", None), ("end", None), ("http", "later")]
