"""The run's analyses without a kernel: the control socket's answers, the watched file, timed ends."""
from __future__ import annotations

import io
import json
import socket
import time
from dataclasses import replace

import pytest

from harness import wait_for
from nftdivert.config import AnalysesConfig, Config
from nftdivert.errors import ConfigError, NftDivertError
from nftdivert.observers import analyses as analyses_mod
from nftdivert.observers.convlog import ConversationLog
from nftdivert.ruleset import owner


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """Analyses serving a control socket under tmp_path, with a log in memory; closed at the end."""
    monkeypatch.setattr(owner, "STATE_DIR", tmp_path / "state")
    config = replace(Config(), analyses=AnalysesConfig(file=str(tmp_path / "tasks.toml"),
                                                       directory=str(tmp_path / "evidence")))
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    served = analyses_mod.Analyses(config, log)
    served.open()
    log.tasks, log.route = served.owner, served.route
    try:
        yield served, log, out
    finally:
        served.close()
        log.close()


def records(log: ConversationLog, out: io.StringIO) -> list[dict]:
    log.drain()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_start_and_end_answer_at_once_and_refuse_what_they_cannot_do(lab, tmp_path):
    served, log, out = lab
    said = analyses_mod.ask("nftdivert", {"op": "start", "task": "t1", "clients": ["192.0.2.10", "2001:db8:1::/64"]})
    assert said.startswith("task t1 started: 192.0.2.10/32, 2001:db8:1::/64; evidence in ")
    assert served.owner("2001:db8:1::7", time.time()) == "t1"
    with pytest.raises(ConfigError, match="duplicate"):
        analyses_mod.ask("nftdivert", {"op": "start", "task": "t1", "clients": ["192.0.2.11"]})
    with pytest.raises(ConfigError, match="unknown"):
        analyses_mod.ask("nftdivert", {"op": "end", "task": "t2"})
    with pytest.raises(ConfigError, match="op must be"):
        analyses_mod.ask("nftdivert", {"op": "pause", "task": "t1"})
    ended = analyses_mod.ask("nftdivert", {"op": "end", "task": "t1"})
    assert ended.endswith("conversations.jsonl, summary.txt, summary.json, report.html"), ended
    assert served.owner("192.0.2.10", time.time()) is None
    assert [(r["event"], r["action"]) for r in records(log, out)] == [("task", "start"), ("task", "end")]
    own = (tmp_path / "evidence" / "t1" / "conversations.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in own] == ["start", "end"]


def test_an_unreadable_request_gets_an_answer_and_the_socket_serves_on(lab):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(analyses_mod.control_path("nftdivert")))
        sock.sendall(b"{not json\n")
        answer = json.loads(sock.makefile().readline())
    assert "unreadable request" in answer["error"]
    assert analyses_mod.ask("nftdivert", {"op": "start", "task": "t1", "clients": ["192.0.2.10"]})


def test_no_run_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(owner, "STATE_DIR", tmp_path)
    with pytest.raises(ConfigError, match="no nftdivert run owns"):
        analyses_mod.ask("nftdivert", {"op": "end", "task": "t1"})
    analyses_mod.control_path("nftdivert").write_text("")  # a killed run's leftover: not a socket that answers
    with pytest.raises((ConfigError, NftDivertError)):
        analyses_mod.ask("nftdivert", {"op": "end", "task": "t1"})


def test_the_file_starts_ends_and_times_out_tasks_and_a_bad_one_changes_nothing(lab, tmp_path):
    served, log, out = lab
    tasks_file, tmp = tmp_path / "tasks.toml", tmp_path / "tasks.tmp"

    def says(text: str) -> None:
        tmp.write_text(text)
        tmp.replace(tasks_file)

    def logged(action: str, task: str | None = None) -> bool:
        return any(r["event"] == "task" and r["action"] == action and r.get("task", task) == task
                   for r in records(log, out))

    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
    says(f'[[task]]\nid = "f1"\nclients = ["192.0.2.20"]\n[[task]]\nid = "f2"\nclients = ["192.0.2.21"]\nend = {soon}\n')
    wait_for(lambda: logged("start", "f1") and logged("start", "f2"), 5, "the file's tasks to start")
    assert served.owner("192.0.2.20", time.time()) == "f1"
    says('[[task]]\nid = "f2"\nclients = ["192.0.2.21"]\nend = ' + soon + "\n")
    wait_for(lambda: logged("end", "f1"), 5, "f1 to end: the file no longer lists it")
    wait_for(lambda: logged("end", "f2"), 10, "f2 to end at the end the file gave it")
    says('[[task]]\nid = "x/y"\nclients = ["192.0.2.22"]\n')
    wait_for(lambda: logged("refused"), 5, "the bad file to be refused")
    assert (tmp_path / "evidence" / "f2" / "report.html").exists()
    says('[[task]]\nid = "f1"\nclients = ["192.0.2.20"]\n')  # an id this run has had does not start again
    # A barrier: the thread reads the file after each answer, so by the second answer it has read it.
    analyses_mod.ask("nftdivert", {"op": "start", "task": "after", "clients": ["192.0.2.23"]})
    analyses_mod.ask("nftdivert", {"op": "end", "task": "after"})
    assert served.table.tasks(time.time()) == []
    assert [r.get("task") for r in records(log, out) if r.get("action") == "start"] == ["f1", "f2", "after"]


def test_a_task_may_choose_one_of_the_runs_profiles_and_the_run_hears_of_each_table(tmp_path, monkeypatch):
    from nftdivert.config import Profile

    monkeypatch.setattr(owner, "STATE_DIR", tmp_path / "state")
    out = io.StringIO()
    log = ConversationLog(out, as_json=True)
    served = analyses_mod.Analyses(replace(Config(), profiles=(Profile("sinkhole"),)), log)
    heard: list = []
    served.on_change = lambda table: heard.append(table.profiles(time.time()))
    served.open()
    try:
        with pytest.raises(ConfigError) as info:
            analyses_mod.ask("nftdivert", {"op": "start", "task": "t0", "clients": ["192.0.2.10"], "profile": "c2"})
        assert str(info.value) == ("--profile = 'c2': no [[profiles]] of that name in the run's config "
                                   "(it has: sinkhole)"), str(info.value)
        assert {"t0": "c2"} not in heard and not served.table.known("t0")  # refused before anything changed
        said = analyses_mod.ask("nftdivert", {"op": "start", "task": "t1", "clients": ["192.0.2.10"],
                                              "profile": "sinkhole"})
        assert said == "task t1 started: 192.0.2.10/32; profile sinkhole", said
        assert heard[-1] == {"t1": "sinkhole"}  # before the answer
        served.profile_names = frozenset({"c2"})  # a reload
        with pytest.raises(ConfigError, match="it has: c2"):
            analyses_mod.ask("nftdivert", {"op": "start", "task": "t2", "clients": ["192.0.2.11"], "profile": "sinkhole"})
        analyses_mod.ask("nftdivert", {"op": "end", "task": "t1"})
        after = heard[heard.index({"t1": "sinkhole"}) + 1:]
        assert after and all(profiles == {} for profiles in after), heard  # (the prune and due ends tell it too)
        task_records = [r for r in records(log, out) if r["event"] == "task"]
        assert [(r["action"], r.get("profile")) for r in task_records] == [("start", "sinkhole"), ("end", None)]
    finally:
        served.close()
        log.close()
