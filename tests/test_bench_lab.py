"""The benchmark's lab row, tiny: 3 clients for 3 s on both divert paths.

`make bench` runs it with 50 clients for 60 s; this keeps the row from
rotting: the clients' exchanges, the processes found in the run's tree, the
log's checks, and the cleanup (also after Ctrl-C).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from nftdivert.lab import netns as lab_netns

BENCH = harness.REPO / "bench"
sys.path.insert(0, str(BENCH))

import lab_run  # noqa: E402
import lab_topology  # noqa: E402


def _bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / "divert_bench.py"), "--lab-only", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=harness._env(), **kw)


def _left_by(pid: int) -> list[str]:
    return [name for name, owner in lab_netns.owners(lab_topology.NS_PREFIX).items() if owner == pid]


@pytest.mark.kernel
def test_the_lab_row_runs_tiny_on_both_paths(tmp_path):
    results = tmp_path / "bench.json"
    proc = _bench("--lab-clients", "3", "--lab-seconds", "3", "--lab-unique-ports", "--json", str(results))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert _left_by(proc.pid) == []
    rows = json.loads(results.read_text())["lab"]["rows"]
    assert set(rows) == {"kernel", "queue", "queue-1w"}  # the queue path again with one queue worker
    for path, row in rows.items():
        assert row["clients"] == 3 and sum(row["errors"].values()) == 0, (path, row["errors"], row["first_error"])
        assert all(row["by_kind"][kind]["count"] > 0 for kind in ("dns", "http", "https", "echo", "udp", "ping")), \
            (path, row["by_kind"])
        log = row["log"]
        assert log["ok"] and log["starts"] == log["ends"] > 0, (path, log)
        assert row["listeners"] and all(name.startswith("listener ") for name in row["listeners"]) \
            and {"run", "observer", "capture"} <= set(row["cpu_seconds"]), \
            (path, row["cpu_seconds"])
        assert row["cpu_seconds"]["listener 1"] > 0 and sum(row["listeners_cpu_per_core"].values()) > 0, row
        start, end = row["listeners_rss_mb"]["listener 1"]
        assert 0 < start <= end, row["listeners_rss_mb"]
        assert row["clients_cpu_seconds"] > 0 and len(row["machine_busy_per_core"]) == os.cpu_count(), row
        assert row["capture"]["packets"] > 0 and row["capture"]["overruns"] == 0, row["capture"]
    assert "log check" in out and "listener 1" in out
    workers = harness.WORKERS
    gain = json.loads(results.read_text())["lab"]["workers_gain"]
    if workers > 1:  # each queue worker's process measured, and what they gain over one
        assert {f"worker {k}" for k in range(workers)} <= set(rows["queue"]["cpu_seconds"]), rows["queue"]["cpu_seconds"]
        assert not any(g.startswith("worker ") for g in rows["queue-1w"]["cpu_seconds"]), rows["queue-1w"]["cpu_seconds"]
        assert gain["workers"] == workers and gain["per_s"] > 0, gain
        assert f"{workers} queue workers (one per core) vs one" in out, out[-2000:]


@pytest.mark.kernel
def test_ctrl_c_in_the_lab_removes_every_namespace_and_process():
    proc = _bench("--lab-clients", "2", "--lab-seconds", "60", "--json", "/dev/null")
    try:
        for line in proc.stderr:  # until the clients run: nftdivert and the clients are up
            if "at once for" in line:
                break
        assert _left_by(proc.pid), "the lab is up"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert _left_by(proc.pid) == []


def test_the_log_check_finds_a_second_start_and_an_end_of_another_run(tmp_path):
    made = [["tcp", "192.0.2.10:40000", "198.18.0.1:443", "a.example"]]
    start = {"event": "start", "id": 1, "protocol": "tcp", "client": made[0][1], "original_destination": made[0][2],
             "name": "a.example"}
    good = [start, {**start, "event": "end"}]
    for records, wrong in ((good, None),
                           ([*good, start], "duplicate_starts"),
                           ([*good, {**start, "event": "end", "id": 2}], "ends_without_start"),
                           ([{**start, "event": "end"}], "conversations_missing")):
        log = tmp_path / "log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
        got = lab_run.check_log(log, made, [])
        assert got["ok"] == (wrong is None) and (wrong is None or got[wrong]), (wrong, got)


def _conversation(ident: int, client: str, dest: str) -> list[dict]:
    common = {"id": ident, "client": client, "original_destination": dest}
    return [{"event": "start", "protocol": "tcp", **common}, {"event": "end", "ended": "closed", **common}]


def _check_log(tmp_path, records: list[dict], made: list[list]) -> dict:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    return lab_run.check_log(log, made, [])


def test_two_conversations_that_share_conntracks_32_bit_id_are_both_counted(tmp_path):
    a, b = ("192.0.2.27:41478", "198.18.13.109:80"), ("192.0.2.15:33820", "198.18.39.42:80")
    records = _conversation(1638318460, *a)[:1] + _conversation(1638318460, *b) + _conversation(1638318460, *a)[1:]
    out = _check_log(tmp_path, records, [["tcp", *a, ""], ["tcp", *b, ""]])
    assert out["ok"] and out["starts"] == out["ends"] == 2, out


def test_one_connect_logged_as_two_conversations_fails_and_shows_both(tmp_path):
    client, dest = "192.0.2.14:50496", "198.51.100.115:63589"
    records = _conversation(4247220884, client, dest) + _conversation(2547226703, client, dest)
    out = _check_log(tmp_path, records, [["tcp", client, dest, ""]])
    assert not out["ok"] and out["conversations_unexpected"] == 1, out
    assert len(out["forensics"][client]) == 4, out["forensics"]
