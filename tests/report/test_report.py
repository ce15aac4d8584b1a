"""`nftdivert report`: the page from hostile logs is strict HTML with nothing active in it,
and its work and size stay bounded however large the log.

Why no browser: Chromium is about 530 MB to install on a fresh Debian 12
(127 packages; 290 MB for the browser alone), for one test. The page has no
script and loads nothing, so what a browser would add is rendering; what can go
wrong in our output is structure and injection, which html5lib's strict
parser (the HTML5 parsing algorithm, failing on any parse error) and a walk of
the tree check exactly.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta

import pytest

from conftest import REPO, nftdivert_argv
from htmlcheck import strict_tree, text_of
from nftdivert.report import digest as digest_mod, page

HOSTILE = [
    "<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "'><svg onload=alert(1)>",
    "</td></tr></table><iframe src=//203.0.113.9/>", "{{ 7*7 }}{% raw %}", "javascript:alert(1)",
    "<!--", "]]><![CDATA[", "\u202eevil\u0000nul", "&amp;lt;",
]
def start(i: int, dest: str, name: str, proto: str = "tcp", when: str = "2026-11-28T04:15:00.000Z") -> dict:
    return {"v": 1, "time": when, "event": "start", "id": i, "protocol": proto, "client": f"192.0.2.2:{40000 + i}",
            "client_address": "192.0.2.2", "original_destination": dest, "name": name, "listener": "tcp-echo"}


def hostile_log() -> list[object]:
    recs: list[object] = []
    for i, evil in enumerate(HOSTILE):
        recs.append(start(i, f"198.18.0.{i + 1}:{4444 + i}", evil, proto=evil if i % 2 else "tcp"))
        recs.append({**start(i, f"198.18.0.{i + 1}:4444", evil), "event": "end", "time": "2026-11-28T04:15:01.000Z",
                     "sent": {"packets": 1, "bytes": 60}, "received": None, "ended": evil})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.500Z", "event": "dns", "client": "192.0.2.2:5353",
                     "name": evil, "type": evil, "answer": evil, "rcode": "NOERROR"})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.600Z", "event": "tls", "client": evil, "sni": evil,
                     "versions_offered": [evil], "alpn_offered": [evil], "result": "failed", "error": evil})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.700Z", "event": "http", "client": "192.0.2.2:1",
                     "method": evil, "url": f"http://{evil}/{evil}", "status": evil, "body_size": 3,
                     "body_sha256": evil, "body_saved": evil})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.800Z", "event": "smtp", "mail_from": evil,
                     "rcpt_to": [evil], "size": 1, "sha256": evil, "saved": f"/var/lib/x/{evil}"})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.900Z", "event": "ftp_upload", "name": evil,
                     "size": 1, "sha256": evil, "saved": "/srv/up/\"><script>x</script>"})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.900Z", "event": "pop3", "user": evil, "password": evil})
        recs.append({"v": 1, "time": "2026-11-28T04:15:00.900Z", "event": "ssh", "client_version": evil,
                     "logins": [{"user": evil, "password": evil}]})
        recs.append({"v": 1, "time": evil, "event": f"admission_{evil}", evil: evil})
        recs.append({"v": evil, "time": "2026-11-28T04:15:00.900Z", "event": evil, evil: [evil, {evil: evil}]})
    # Wrong types everywhere: each is shown as text or counted, never a crash.
    recs += [{"event": "start", "id": "x", "time": 5, "sent": "lots", "process": [1, 2], "client": None},
             {"event": "end", "id": 0, "sent": {"bytes": "many"}, "received": {"bytes": -5}, "time": "yesterday"},
             {"event": "http", "url": {"nested": True}, "body_size": "big", "body_saved": 7},
             {"event": "dns", "name": ["a", "b"]}, {"event": None}, {"event": 7}, {},
             [1, 2], "just a string", 42, None]
    return recs


def write_log(path, recs, extra: bytes = b"") -> None:
    with open(path, "wb") as f:
        for rec in recs:
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(extra)


def test_hostile_values_are_shown_as_text_and_nothing_in_the_page_is_active(tmp_path):
    log = tmp_path / "hostile.jsonl"
    write_log(log, hostile_log(), extra=b"\xff\xfe not utf-8\n{\"unterminated\": \n" + b"[" * 100_000 + b"\n")
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    d = page.write(str(log), str(out))
    html = out.read_text()
    doc = strict_tree(html)
    shown = text_of(doc)
    for evil in HOSTILE:
        assert digest_mod.text(evil)[:20] in shown, evil  # shown as the text it is (controls as \uXXXX)
    assert "<script" not in html.lower() and "onerror=" not in html.replace("onerror=alert", "")  # only escaped
    assert "{{ 7*7 }}" in shown and "=49" not in shown  # no template evaluated
    assert html.count("<a ") == len(HOSTILE) * 2  # mail and upload links: absolute paths only
    assert d.unreadable == 3 + 4  # not UTF-8, cut off, nested too deep; 4 lines that are no object
    assert d.malformed == 0  # every wrong type was shown as text, not refused
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    print(f"\nreport (hostile log): {out}")


def test_unknown_kinds_are_counted_and_listed_and_drops_get_their_section(tmp_path):
    recs = [start(1, "198.51.100.7:45678", "")]
    recs += [{"v": 1, "time": "2026-11-28T04:15:02.000Z", "event": "admission", "client_address": "192.0.2.66",
              "protocol": "udp", "dropped": 12}] * 3
    recs += [{"v": 2, "time": "2026-11-28T04:15:03.000Z", "event": "quic", "sni": "new.example"}] * 7
    log = tmp_path / "kinds.jsonl"
    write_log(log, recs)
    d = page.read(str(log))
    assert d.dropped_kinds == {"admission": 3} and len(d.dropped) == 3
    assert d.unknown.counts["quic"]["records"] == 7 and len(d.examples["quic"].rows) == digest_mod.EXAMPLES
    shown = text_of(strict_tree(page.render(d, "kinds.jsonl", tmp_path)))
    assert "quic" in shown and "sni=new.example" in shown and "client_address=192.0.2.66" in shown
    assert "2: 7" in shown  # the schema versions seen


def test_a_huge_log_is_streamed_and_every_table_stays_bounded(tmp_path):
    """60,000 conversations to distinct destinations and names, a 3 MB line, 300 kinds, versions and protocols: tables keep their
    first or busiest rows and count the rest, and the page stays small."""
    log = tmp_path / "huge.jsonl"
    with open(log, "wb") as f:
        for i in range(60_000):
            dest = f"198.18.{i // 250}.{i % 250}:{1 + i % 60000}"
            f.write(json.dumps(start(i, dest, f"dga{i}.example")).encode() + b"\n")
            f.write(json.dumps({"v": 1, "time": "2026-11-28T04:15:00.000Z", "event": "dns",
                                "name": f"dga{i}.example", "type": "A", "answer": "198.18.0.1"}).encode() + b"\n")
        f.write(b'{"v": 1, "event": "http", "url": "' + b"x" * 3_000_000 + b'"}\n')
        for k in range(300):  # new kinds, schema versions and protocols in every record
            f.write(json.dumps({"v": 1, "event": f"kind{k}"}).encode() + b"\n")
            f.write(json.dumps({**start(k, "192.0.2.1:1", "", proto=f"p{k}"), "v": k}).encode() + b"\n")
    began = time.monotonic()
    d = page.read(str(log))
    out = tmp_path / "report.html"
    html = page.render(d, "huge.jsonl", tmp_path)
    took = time.monotonic() - began
    assert d.lines == 120_601 and d.unreadable == 1
    assert len(d.versions) == len(d.protocols) == digest_mod.KINDS + 1  # and "(others)"
    assert len(d.destinations.counts) == digest_mod.KEYS and d.destinations.other["conversations"] == 55_300
    assert len(d.names.counts) == digest_mod.KEYS and len(d.conversations.rows) == digest_mod.ROWS
    assert d.conversations.more == 60_300 - digest_mod.ROWS and len(d.timeline) == digest_mod.TIMELINE
    assert len(d.unknown.counts) == digest_mod.KINDS and d.unknown.other["records"] == 200
    assert len(html) < 2_000_000, len(html)
    out.write_text(html)
    strict_tree(html)
    assert "and 59800 more conversations, not shown" in html
    print(f"\nreport of {log.stat().st_size} bytes: read and rendered in {took:.1f} s, page {len(html)} bytes")


def test_links_to_saved_files_are_relative_to_the_page():
    assert page.link("/var/lib/nftdivert/bodies/ab", REPO) == \
        "/".join([".."] * len(REPO.parts[1:])) + "/var/lib/nftdivert/bodies/ab"
    assert page.link("/tmp/x/a b#c?.eml", page.Path("/tmp/x")) == "./a%20b%23c%3F.eml"
    for bad in ("javascript:alert(1)", "relative/file", "", "/a\0b"):
        assert page.link(bad, page.Path("/tmp")) == ""


@pytest.mark.parametrize("path, reason", [("/dev/zero", "not a regular file or a pipe"),
                                          ("/nonexistent/log.jsonl", "No such file")])
def test_a_log_that_is_no_file_is_bad_input_in_one_line(path, reason, tmp_path, cli_env):
    proc = subprocess.run(nftdivert_argv("report", path, "-o", str(tmp_path / "r.html")), capture_output=True,
                          text=True, env=cli_env, timeout=60)
    assert proc.returncode == 2 and reason in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "r.html").exists()


def test_an_output_that_cannot_be_written_fails_at_once_naming_it(tmp_path, cli_env):
    log = tmp_path / "log.jsonl"
    write_log(log, [start(1, "198.51.100.7:1", "")])
    target = tmp_path / "missing" / "r.html"
    proc = subprocess.run(nftdivert_argv("report", str(log), "-o", str(target)), capture_output=True, text=True,
                          env=cli_env, timeout=60)
    assert proc.returncode == 1 and proc.stderr == f"nftdivert: {target}: No such file or directory\n", proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_the_histogram_covers_any_span_in_the_same_bins():
    """Starts a second apart for a day, then one in the year 9999: bins widen, nothing is lost."""
    d = digest_mod.Digest()
    for i in range(86_400):
        d.starts.add(digest_mod.when("2026-11-28T00:00:00Z") + timedelta(seconds=i))
    assert sum(d.starts.bins.values()) == 86_400 and len(d.starts.bins) <= d.starts.limit
    assert d.starts.width == 256  # 86,400 s in at most 480 bins: 180 s would do, widths double
    d.starts.add(digest_mod.when("9999-12-31T23:59:59Z"))
    d.starts.add(digest_mod.when("0001-01-01T00:00:00Z"))
    assert sum(d.starts.bins.values()) == 86_402 and len(d.starts.bins) <= d.starts.limit
    bars = page.histogram(d)["bars"]
    assert len(bars) == len(d.starts.bins) and all(0 <= b["x"] <= page.WIDTH for b in bars)
