"""Answers per client ([[profiles]]), end to end: two client namespaces behind one gateway,
real `dig` and `curl`, one `nftdivert run`.

The two clients get different DNS answers and different HTTP answers in the
same run; then the profile changes in the config file, SIGHUP, and a new
conversation gets the new answer while the run (its PID, its table) stays.
Every record of a profiled client's conversation names the profile that
answered it (`profile`), a client in no profile's (b over IPv6) none; the
renamed profile's new conversations carry the new name, an end its start's.
A profile's ports left alone reach the client's real destination (here:
containment drops them, so nothing answers), for that client only.

An analysis (task) may choose a profile for its clients, by `nftdivert task
start --profile` or in the analyses file: while it runs they get that
profile's answers whatever their addresses choose, and after its end their
address's again (or the top-level ones).
"""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest

import harness
import netns
from conftest import REPO

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend,
              pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (bind9-dnsutils, see the Makefile)")]

SINKHOLE, C2 = "198.51.100.80", "203.0.113.80"
ELSEWHERE6 = "2001:db8:ffff::80"  # b asks it over IPv6: its IPv6 address is in no profile


def documented_example() -> str:
    """The block after `<!-- profiles: example -->` in the usage page: run here as written."""
    text = (REPO / "docs/usage.md").read_text()
    found = re.search(r"<!-- profiles: example -->\n```toml\n(.*?)```\n", text, re.S)
    assert found, "docs/usage.md has no example marked profiles: example"
    return found.group(1)


def config(sinkhole_body: str = "sinkholed", sinkhole_address: str = SINKHOLE, left_alone: int = 8081,
           name: str = "sinkhole") -> str:
    """The documented example, with the sinkhole's name, answers and port as given; one listener
    process: the reload record says when it answers anew."""
    example = (documented_example().replace('"sinkholed\\n"', f'"{sinkhole_body}\\n"')
               .replace('name = "sinkhole"', f'name = "{name}"')
               .replace(f'"{SINKHOLE}"', f'"{sinkhole_address}"').replace("[8081]", f"[{left_alone}]"))
    return "listener_processes = 1\n" + harness.config_text() + "\n[http]\nbody = \"everyone else\\n\"\n" \
        "bodies_dir = \"\"\n" + example


def dig(client, server: str = harness.DIV_CLIENT4, name: str = "c2.example") -> str:
    out = client.run("dig", "+tries=1", "+time=5", "+short", f"@{server}", name, "A").stdout
    return out.strip()


def curl(client, address: str, port: int = 80) -> str:
    host = f"[{address}]" if ":" in address else address
    proc = client.run("curl", "-sS", "-m", "10", "-H", "Host: c2.example", f"http://{host}:{port}/beacon",
                      check=False)
    return proc.stdout if proc.returncode == 0 else f"curl exit {proc.returncode}"


def profile_of(div, event: str, client: str, destination: str | None = None) -> str | None:
    """The `profile` of the first `event` record of `client` (to `destination`), once written."""
    rec = div.wait_log(lambda r: r.get("event") == event and r.get("client_address") == client
                       and destination in (None, r.get("original_destination")), what=f"{event} of {client}")
    return rec.get("profile")


def assert_ends_carry_their_starts_profile(log: list[dict]) -> None:
    starts = {(r["id"], r["client"], r["original_destination"]): r for r in log if r.get("event") == "start"}
    for end in (r for r in log if r.get("event") == "end"):
        start = starts.get((end["id"], end["client"], end["original_destination"]))
        if start is not None:
            assert end.get("profile") == start.get("profile"), (start, end)


def test_two_clients_get_their_profiles_answers_and_a_reload_changes_them_for_new_conversations(tmp_path):
    lab = harness.BridgeLab(netns, tmp_path, 2)
    div = None
    try:
        lab.bridge_netfilter(False)
        a, b = lab.clients
        div = harness.Diverter(lab.diverter_ns, tmp_path, config(), name="profiles").start()
        table = harness.table_handle(lab.diverter_ns)
        # Client a: its own profile (the /32 inside b's /24: the longest prefix wins), over IPv4 and IPv6.
        assert dig(a) == SINKHOLE and dig(a, harness.DIV_CLIENT6) == SINKHOLE
        assert dig(b) == C2
        assert curl(a, SINKHOLE) == "sinkholed\n"
        assert curl(b, C2) == "next stage\n"
        # Port 8081 is left alone for a only: containment drops it, so a gets no answer there.
        assert curl(a, SINKHOLE, 8081).startswith("curl exit")
        assert curl(b, C2, 8081) == "next stage\n"
        # b over IPv6 is a client in no profile: the top-level answers.
        assert dig(b, harness.DIV_CLIENT6) not in ("", SINKHOLE, C2)
        assert curl(b, ELSEWHERE6) == "everyone else\n"
        a4, b4, b6 = harness.bridge_client(0), harness.bridge_client(1), harness.bridge_client(1, 6)
        for event in ("dns", "start", "http"):
            assert profile_of(div, event, a4, None if event == "dns" else f"{SINKHOLE}:80") == "sinkhole"
            assert profile_of(div, event, b4, None if event == "dns" else f"{C2}:80") == "scripted-c2"
            assert profile_of(div, event, b6, None if event == "dns" else f"[{ELSEWHERE6}]:80") is None

        div.config_path.write_text(config("sinkholed again", "198.51.100.81", 8082, name="sinkhole-renamed"))
        div.proc.send_signal(signal.SIGHUP)
        done = div.wait_log(lambda r: r.get("event") == "reload", what="the reload record")
        assert "error" not in done, done
        assert dig(a) == "198.51.100.81" and dig(b) == C2
        assert curl(a, "198.51.100.81") == "sinkholed again\n"
        assert curl(b, C2) == "next stage\n"
        assert curl(a, SINKHOLE, 8081) == "sinkholed again\n"  # no longer left alone
        assert curl(a, SINKHOLE, 8082).startswith("curl exit")
        for event in ("start", "http"):  # new conversations: the profile's new name
            assert profile_of(div, event, a4, "198.51.100.81:80") == "sinkhole-renamed"
        # Nothing restarted: the same run, the same table.
        assert div.alive() and harness.table_handle(lab.diverter_ns) == table
        assert "reload: " in div.stderr()
        questions = [r for r in div.log() if r.get("event") == "dns"]
        by_client = {(r["client_address"], r["answer"]) for r in questions}
        assert (harness.bridge_client(0), SINKHOLE) in by_client and (harness.bridge_client(1), C2) in by_client, \
            json.dumps(questions)[:2000]
        assert {r.get("profile") for r in questions if r["answer"] == "198.51.100.81"} == {"sinkhole-renamed"}
        div.stop_and_check()
        log = div.log()
        assert_ends_carry_their_starts_profile(log)
        of = {client: {r.get("profile") for r in log if r.get("client_address") == client
                       and r.get("event") in ("start", "end", "dns", "http")} for client in (a4, b4, b6)}
        assert of == {a4: {"sinkhole", "sinkhole-renamed"}, b4: {"scripted-c2"}, b6: {None}}, of
    finally:
        if div is not None:
            div.kill()
        harness.nftdivert(lab.diverter_ns, "remove", check=False)
        lab.close()


TASK_PROFILES = harness.ECHO_LISTENERS + harness.DNS_LISTENER + """
[[profiles]]                       # no clients: only the tasks that choose it
name = "sinkhole"
dns = { one_address = "198.51.100.80" }
http = { body = "sinkholed\\n" }
leave_alone = { tcp_ports = [8081] }

[[profiles]]
name = "own-b"
clients = ["192.0.2.11/32"]
http = { body = "b's own\\n" }
"""


def task_config(analyses) -> str:
    """Two listener processes: the DNS listener is in the first, conversations go to either."""
    return ("listener_processes = 2\n" + harness.config_text() + '\n[http]\nbody = "everyone else\\n"\n'
            f'bodies_dir = ""\n[analyses]\nfile = "{analyses}"\n' + TASK_PROFILES)


def ask(client, name: str) -> str:
    return dig(client, name=name)


def question(div, client: str, name: str) -> dict:
    return div.wait_log(lambda r: r.get("event") == "dns" and r["client_address"] == client and r["name"] == name,
                        what=f"the question {name} of {client}")


def first(div, event: str, client: str, destination: str) -> dict:
    return div.wait_log(lambda r: r.get("event") == event and r.get("client_address") == client
                        and r.get("original_destination") == destination, what=f"{event} of {client} to {destination}")


def test_a_task_chooses_a_profile_for_its_clients_while_it_runs(tmp_path):
    lab = harness.BridgeLab(netns, tmp_path, 2)
    div = None
    analyses = tmp_path / "analyses.toml"
    try:
        lab.bridge_netfilter(False)
        a, b = lab.clients
        a4, b4, a6 = harness.bridge_client(0), harness.bridge_client(1), harness.bridge_client(0, 6)
        div = harness.Diverter(lab.diverter_ns, tmp_path, task_config(analyses), name="task-profiles").start()

        def task(*args: str):
            return harness.nftdivert(lab.diverter_ns, "task", *args, check=False)

        pooled = ask(a, "before.example")
        assert pooled not in ("", SINKHOLE)
        assert curl(a, "198.51.100.81") == "everyone else\n" and curl(b, "198.51.100.81") == "b's own\n"
        refused = task("start", "T-0", "--client", a4, "--profile", "nosuch")
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "--profile = 'nosuch'" in refused.stderr and "sinkhole" in refused.stderr, refused.stderr

        started = task("start", "T-1", "--client", a4, "--client", a6, "--client", b4, "--profile", "sinkhole")
        assert started.returncode == 0 and "profile sinkhole" in started.stdout, started.stderr
        assert ask(a, "during.example") == SINKHOLE and ask(b, "during.example") == SINKHOLE
        assert curl(a, SINKHOLE) == "sinkholed\n" and curl(b, SINKHOLE) == "sinkholed\n"
        assert curl(a, SINKHOLE, 8081).startswith("curl exit")  # the profile leaves it alone: containment drops it
        for rec in (question(div, a4, "during.example"), question(div, b4, "during.example"),
                    first(div, "start", a4, f"{SINKHOLE}:80"), first(div, "http", a4, f"{SINKHOLE}:80"),
                    first(div, "start", b4, f"{SINKHOLE}:80"), first(div, "http", b4, f"{SINKHOLE}:80")):
            assert (rec.get("profile"), rec.get("task")) == ("sinkhole", "T-1"), rec
        # The profile's one address stands for the name last asked: the log names the conversation by it.
        assert first(div, "start", b4, f"{SINKHOLE}:80").get("name") == "during.example"
        assert task("end", "T-1").returncode == 0

        # Ended: the top-level answers for a, its address's profile for b; no profile named, no task.
        assert ask(a, "after.example") not in ("", SINKHOLE)
        assert curl(a, "198.51.100.82") == "everyone else\n" and curl(b, "198.51.100.82") == "b's own\n"
        assert curl(a, SINKHOLE, 8081) == "everyone else\n"  # diverted again
        for rec in (question(div, a4, "after.example"), first(div, "start", a4, "198.51.100.82:80"),
                    first(div, "http", a4, "198.51.100.82:80"), first(div, "start", a4, f"{SINKHOLE}:8081")):
            assert "profile" not in rec and "task" not in rec, rec
        assert first(div, "http", b4, "198.51.100.82:80").get("profile") == "own-b"

        # The analyses file: the same choice, and the same refusal of a profile the run has not.
        tmp = tmp_path / "analyses.tmp"
        tmp.write_text(f'[[task]]\nid = "F-1"\nclients = ["{a4}"]\nprofile = "sinkhole"\n')
        tmp.replace(analyses)
        rec = div.wait_log(lambda r: r.get("event") == "task" and r.get("task") == "F-1", what="F-1's start")
        assert rec["action"] == "start" and rec["profile"] == "sinkhole", rec
        assert ask(a, "filed.example") == SINKHOLE
        assert question(div, a4, "filed.example").get("profile") == "sinkhole"
        tmp.write_text(f'[[task]]\nid = "F-1"\nclients = ["{a4}"]\nprofile = "nosuch"\n')
        tmp.replace(analyses)
        rec = div.wait_log(lambda r: r.get("event") == "task" and r.get("action") == "refused", what="the refusal")
        assert "profile" in rec["error"] and "nosuch" in rec["error"], rec
        tmp.write_text("")
        tmp.replace(analyses)
        div.wait_log(lambda r: r.get("event") == "task" and r.get("task") == "F-1" and r["action"] == "end",
                     what="F-1's end")
        assert ask(a, "unfiled.example") not in ("", SINKHOLE)
        assert "profile" not in question(div, a4, "unfiled.example")
        div.stop_and_check()
        assert_ends_carry_their_starts_profile(div.log())
    finally:
        if div is not None:
            div.kill()
        harness.nftdivert(lab.diverter_ns, "remove", check=False)
        lab.close()


def test_a_task_the_analyses_file_held_before_the_run_has_its_profile_from_the_first_conversation(tmp_path):
    """The file's task starts before the ruleset is in: its profile's ports left alone go into
    the sets the ruleset brings, and the listeners have its choice before they get a conversation."""
    lab = harness.BridgeLab(netns, tmp_path, 1)
    div = None
    analyses = tmp_path / "analyses.toml"
    try:
        lab.bridge_netfilter(False)
        a, a4 = lab.clients[0], harness.bridge_client(0)
        analyses.write_text(f'[[task]]\nid = "early"\nclients = ["{a4}"]\nprofile = "sinkhole"\n')
        div = harness.Diverter(lab.diverter_ns, tmp_path, task_config(analyses), name="early").start()
        assert ask(a, "early.example") == SINKHOLE
        assert curl(a, SINKHOLE) == "sinkholed\n"
        assert curl(a, SINKHOLE, 8081).startswith("curl exit")  # left alone: containment drops it
        rec = first(div, "start", a4, f"{SINKHOLE}:80")
        assert (rec.get("profile"), rec.get("task")) == ("sinkhole", "early"), rec
        div.stop_and_check()
    finally:
        if div is not None:
            div.kill()
        harness.nftdivert(lab.diverter_ns, "remove", check=False)
        lab.close()
