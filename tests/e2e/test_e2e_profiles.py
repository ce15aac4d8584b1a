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


def dig(client, server: str = harness.DIV_CLIENT4) -> str:
    out = client.run("dig", "+tries=1", "+time=5", "+short", f"@{server}", "c2.example", "A").stdout
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
