"""An analysis's evidence directory: its records, its copies of saved files, its summary and report."""
from __future__ import annotations

import json

import pytest

from nftdivert.errors import ConfigError
from nftdivert.observers import evidence

START = {"v": 1, "time": "2027-01-15T08:00:00.250Z", "event": "start", "id": 7, "protocol": "tcp",
         "client": "192.0.2.2:40000", "client_address": "192.0.2.2", "task": "t1",
         "original_destination": "198.51.100.7:80", "listener": "tcp-echo", "listener_port": 1337, "interface": "eth1"}


def test_records_and_saved_files_are_kept_and_the_end_summarizes(tmp_path):
    saved = tmp_path / "bodies" / ("ab" * 32)
    saved.parent.mkdir()
    saved.write_bytes(b"exfiltrated")
    ev = evidence.Evidence("t1", evidence.create(str(tmp_path / "evidence"), "t1"))
    ev.write(START)
    ev.write({"v": 1, "time": "2027-01-15T08:00:00.300Z", "event": "http", "client": "192.0.2.2:40000",
              "client_address": "192.0.2.2", "task": "t1", "method": "POST", "url": "http://x.example/",
              "status": 200, "body_size": 11, "body_sha256": "ab" * 32, "body_saved": str(saved)})
    other = tmp_path / "bodies" / ".part-x"
    other.write_bytes(b"replaced later, as the services replace a file")
    other.replace(saved)  # the task keeps what it was given
    assert ev.finish() == ["conversations.jsonl", "summary.txt", "summary.json", "report.html"]
    where = tmp_path / "evidence" / "t1"
    lines = [json.loads(line) for line in (where / "conversations.jsonl").read_text().splitlines()]
    assert lines[0] == START
    copy = where / "files" / ("ab" * 32)
    assert lines[1]["body_saved"] == str(copy) and copy.read_bytes() == b"exfiltrated"
    assert "198.51.100.7" in (where / "summary.txt").read_text()
    assert json.loads((where / "summary.json").read_text())
    assert "POST" in (where / "report.html").read_text()


def test_a_directory_left_by_an_earlier_run_is_refused(tmp_path):
    evidence.create(str(tmp_path), "t1")
    with pytest.raises(ConfigError, match="exists already"):
        evidence.create(str(tmp_path), "t1")


def test_a_conversation_still_open_at_the_end_gets_its_end_in_the_tasks_log(tmp_path):
    ev = evidence.Evidence("t1", evidence.create(str(tmp_path), "t1"))
    ev.write(START)
    ev.write({**START, "id": 8, "client": "192.0.2.2:40001"})
    ev.write({**START, "id": 8, "client": "192.0.2.2:40001", "event": "end", "duration": 1.0, "sent": None,
              "received": None, "ended": "closed"})
    ev.end_open(None, 1800000000.0)  # conntrack could not be asked: its state is unknown
    ev.finish()
    lines = [json.loads(line) for line in (tmp_path / "t1" / "conversations.jsonl").read_text().splitlines()]
    assert [(r["event"], r["id"], r.get("ended")) for r in lines] == [("start", 7, None), ("start", 8, None),
                                                                      ("end", 8, "closed"), ("end", 7, "unknown")]
    assert lines[-1]["task"] == "t1" and not ev.open
