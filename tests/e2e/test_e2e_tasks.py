"""End to end: analyses (tasks) on a gateway of several clients.

Three client namespaces on one bridge. Two analyses run at once, started
and ended by `nftdivert task` while `nftdivert run` runs: each gets its
own directory with a log and a pcap holding only its own conversations
(every record carrying its `task`), a summary and a report; the third
client's conversations carry no task. An address reused by a later
analysis goes to the later one. The analyses file starts and ends a task
when it changes. `nftdivert task` with no run, or with an unknown or
duplicate task, exits 2 with one line.
"""
from __future__ import annotations

import json
import subprocess
import uuid

import pytest

import harness
import netns

# Which task a conversation belongs to, and its evidence, are the observer's: the same on both
# queue backends (any_backend; the VM tier's stock kernel also has no br_netfilter loaded).
pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

CLIENTS = 3
FIELDS = ("ip.src", "ip.dst", "ipv6.src", "ipv6.dst")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    bl = harness.BridgeLab(netns, tmp_path_factory.mktemp("tasks-lab"), CLIENTS)
    bl.bridge_netfilter(True)
    try:
        yield bl
    finally:
        bl.close()


def diverter(lab, tmp_path) -> harness.Diverter:
    """`nftdivert run -w` with [analyses] file and directory, started."""
    tmp_path.chmod(0o755)
    config = (harness.config_text() + f'\n[http]\nbodies_dir = "{tmp_path / "bodies"}"\n[analyses]\n'
              f'file = "{tmp_path / "analyses.toml"}"\ndirectory = "{tmp_path / "evidence"}"\n')
    return harness.Diverter(lab.diverter_ns, tmp_path, config, args=("-w", str(tmp_path / "all.pcap"))).start()


@pytest.fixture
def run(lab, tmp_path):
    """diverter(), stopped cleanly at the end."""
    div = diverter(lab, tmp_path)
    try:
        yield div
        div.stop_and_check()
    finally:
        div.kill()
        harness.nftdivert(lab.diverter_ns, "remove")


def task(lab, *args: str) -> subprocess.CompletedProcess:
    return harness.nftdivert(lab.diverter_ns, "task", *args, check=False)


def talk(lab, i: int, host: str, port: int) -> None:
    """Client i: a TCP exchange and a UDP datagram to host:port, both answered."""
    payload = f"c{i}-{uuid.uuid4().hex[:6]}"
    for kind in ("tcp", "udp"):
        reply = harness.run_client(lab.clients[i], kind, host, str(port), payload)
        assert reply["ok"] and payload in reply.get("reply", payload), reply


def starts_to(records: list[dict], host: str, port: int) -> list[dict]:
    asked = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [r for r in records if r.get("event") == "start" and r["original_destination"] == asked]


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pcap_addresses(path) -> list[set[str]]:
    """Each packet's addresses, as tshark reads the file."""
    proc = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=\t",
                           *(arg for f in FIELDS for arg in ("-e", f))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [{a for a in line.split("\t") if a} for line in proc.stdout.splitlines()]


def test_two_analyses_at_once_each_get_only_their_own_records_and_packets(lab, run, tmp_path):
    c0, c1, c2 = (harness.bridge_client(i) for i in range(CLIENTS))
    started = task(lab, "start", "A-1", "--client", c0)
    assert started.returncode == 0 and "task A-1 started" in started.stdout, started.stderr
    assert task(lab, "start", "B-1", "--client", f"{c1}/32", "--client", "2001:db8:1::b").returncode == 0

    harness.wait_for(lambda: "analyses running: A-1, B-1" in harness.nftdivert(lab.diverter_ns, "status").stdout,
                     10, "`status` to name the tasks running")
    talk(lab, 0, "198.51.100.10", 7001)
    talk(lab, 1, "198.51.100.11", 7002)
    talk(lab, 1, "2001:db8:ffff::11", 7002)  # its IPv6 address is B's too
    talk(lab, 2, "198.51.100.12", 7003)
    talk(lab, 2, "2001:db8:ffff::12", 7003)
    posted = lab.clients[0].run("curl", "-sS", "-o", "/dev/null", "-d", "exfil-of-A", "http://198.51.100.10/post",
                                check=False, timeout=30)
    assert posted.returncode == 0, posted.stderr
    records = harness.log_barrier(lab.clients[2], run, 7999)

    for host, port, tag in (("198.51.100.10", 7001, "A-1"), ("198.51.100.11", 7002, "B-1"),
                            ("2001:db8:ffff::11", 7002, "B-1"), ("198.51.100.12", 7003, None),
                            ("2001:db8:ffff::12", 7003, None)):
        starts = starts_to(records, host, port)
        assert len(starts) == 2, records  # TCP and UDP
        assert all(r.get("task") == tag for r in starts), starts

    for name in ("A-1", "B-1"):
        ended = task(lab, "end", name)
        assert ended.returncode == 0 and f"task {name} ended" in ended.stdout, ended.stderr
        assert "report.html" in ended.stdout, ended.stdout

    evidence = tmp_path / "evidence"
    c1v6 = harness.bridge_client(1, 6)
    for name, clients, host, port in (("A-1", {c0}, "198.51.100.10", 7001), ("B-1", {c1, c1v6}, "198.51.100.11", 7002)):
        own = read_log(evidence / name / "conversations.jsonl")
        assert own and all(r.get("task") == name for r in own), own
        assert len(starts_to(own, host, port)) == 2, own
        conversations = [r for r in own if r.get("event") in ("start", "end")]
        assert {r["client_address"] for r in conversations} == clients, own
        # Each start has its end: what conntrack still tracked at the task's end, `open` with its bytes so far.
        ends = {(r["id"], r["client"], r["original_destination"]): r for r in own if r["event"] == "end"}
        starts = [(r["id"], r["client"], r["original_destination"]) for r in own if r["event"] == "start"]
        assert sorted(ends) == sorted(starts), own
        assert all(e["task"] == name and e["sent"]["bytes"] > 0 for e in ends.values()), own
        assert [r["action"] for r in own if r["event"] == "task"] == ["start", "end"], own
        bodies = [r["body_saved"] for r in own if r["event"] == "http"]
        if name == "A-1":  # what it handed over, in its own directory
            assert len(bodies) == 1 and bodies[0].startswith(str(evidence / name / "files")), own
            assert open(bodies[0], "rb").read() == b"exfil-of-A"
        else:
            assert bodies == [] and not (evidence / name / "files").exists(), own
        packets = pcap_addresses(evidence / name / "capture.pcap")
        assert packets and all(p & clients for p in packets), packets
        assert any(host in p for p in packets), packets
        summary = json.loads((evidence / name / "summary.json").read_text())
        assert f"{host}" in json.dumps(summary) and "198.51.100.12" not in json.dumps(summary), summary
        assert summary["total"]["bytes_sent"] > 0, summary
        assert "<html" in (evidence / name / "report.html").read_text()
        assert host in (evidence / name / "summary.txt").read_text()
    # The run's own pcap has the third client too. The run is still writing it: wait for it.
    def third_client_captured() -> bool:
        try:
            return any(c2 in p for p in pcap_addresses(tmp_path / "all.pcap"))
        except AssertionError:  # tshark met a packet still being written
            return False
    harness.wait_for(third_client_captured, 15, "the third client's packets in the run's pcap")


def test_a_reused_address_goes_to_the_later_analysis_and_errors_exit_2(lab, run, tmp_path):
    c0 = harness.bridge_client(0)
    assert task(lab, "start", "first", "--client", c0).returncode == 0
    talk(lab, 0, "198.51.100.20", 7101)
    assert task(lab, "end", "first").returncode == 0
    assert task(lab, "start", "second", "--client", c0).returncode == 0
    talk(lab, 0, "198.51.100.21", 7102)
    # Overlap: a task never ended, and its address given to another: the later start wins.
    assert task(lab, "start", "third", "--client", "192.0.2.0/24").returncode == 0
    talk(lab, 0, "198.51.100.22", 7103)
    records = harness.log_barrier(lab.clients[0], run, 7998)
    assert {r.get("task") for r in starts_to(records, "198.51.100.20", 7101)} == {"first"}
    assert {r.get("task") for r in starts_to(records, "198.51.100.21", 7102)} == {"second"}
    assert {r.get("task") for r in starts_to(records, "198.51.100.22", 7103)} == {"third"}
    second = read_log(tmp_path / "evidence" / "second" / "conversations.jsonl")  # still being written
    assert {r["original_destination"] for r in second if r["event"] == "start"} == {"198.51.100.21:7102"}, second

    for args, words in ((("end", "first"), "unknown"), (("end", "nosuch"), "unknown"),
                        (("start", "second", "--client", c0), "duplicate"),
                        (("start", "../x", "--client", c0), "task id"),
                        (("start", "x", "--client", "192.0.2.10/24"), "host bits")):
        refused = task(lab, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert len(refused.stderr.splitlines()) == 1 and words in refused.stderr, (args, refused.stderr)
        assert "Traceback" not in refused.stderr


def test_the_analyses_file_starts_and_ends_a_task_when_it_changes(lab, run, tmp_path):
    c2 = harness.bridge_client(2)
    analyses = tmp_path / "analyses.toml"
    tmp = tmp_path / "analyses.tmp"
    tmp.write_text(f'[[task]]\nid = "filed"\nclients = ["{c2}"]\n')
    tmp.replace(analyses)
    run.wait_log(lambda r: r.get("event") == "task" and r.get("action") == "start" and r.get("task") == "filed",
                 what="the file's task to start")
    talk(lab, 2, "198.51.100.30", 7201)
    tmp.write_text("")
    tmp.replace(analyses)
    run.wait_log(lambda r: r.get("event") == "task" and r.get("action") == "end" and r.get("task") == "filed",
                 what="the file's task to end")
    talk(lab, 2, "198.51.100.31", 7202)
    records = harness.log_barrier(lab.clients[2], run, 7997)
    assert {r.get("task") for r in starts_to(records, "198.51.100.30", 7201)} == {"filed"}
    assert {r.get("task") for r in starts_to(records, "198.51.100.31", 7202)} == {None}
    own = read_log(tmp_path / "evidence" / "filed" / "conversations.jsonl")
    assert len(starts_to(own, "198.51.100.30", 7201)) == 2 and not starts_to(own, "198.51.100.31", 7202), own
    # A file that does not validate changes nothing, and says so.
    tmp.write_text('[[task]]\nid = "bad/id"\nclients = ["192.0.2.12"]\n')
    tmp.replace(analyses)
    run.wait_log(lambda r: r.get("event") == "task" and r.get("action") == "refused", what="the refusal")


def test_a_stop_ends_the_tasks_still_running_with_their_evidence(lab, tmp_path):
    div = diverter(lab, tmp_path)
    try:
        assert task(lab, "start", "left-open", "--client", harness.bridge_client(0)).returncode == 0
        talk(lab, 0, "198.51.100.40", 7301)
        harness.log_barrier(lab.clients[0], div, 7996)
        div.stop_and_check()
    finally:
        div.kill()
        harness.nftdivert(lab.diverter_ns, "remove")
    where = tmp_path / "evidence" / "left-open"
    own = read_log(where / "conversations.jsonl")
    assert len(starts_to(own, "198.51.100.40", 7301)) == 2, own
    # The stop ended the conversations first: their ends are the task's too.
    assert len([r for r in own if r["event"] == "end"]) == len([r for r in own if r["event"] == "start"]), own
    assert own[-1]["event"] == "task" and own[-1]["action"] == "end", own
    assert any(harness.bridge_client(0) in p for p in pcap_addresses(where / "capture.pcap"))
    assert (where / "report.html").exists() and (where / "summary.json").exists()


def test_task_without_a_run_exits_2_with_one_line(lab):
    refused = task(lab, "start", "lonely", "--client", harness.bridge_client(0))
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert len(refused.stderr.splitlines()) == 1 and "no nftdivert run owns" in refused.stderr, refused.stderr
