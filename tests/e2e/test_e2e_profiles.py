"""Answers per client ([[profiles]]), end to end: two client namespaces behind one gateway,
real `dig` and `curl`, one `nftdivert run`.

The two clients get different DNS answers and different HTTP answers in the
same run; then the profile changes in the config file, SIGHUP, and a new
conversation gets the new answer while the run (its PID, its table) stays.
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


def documented_example() -> str:
    """The block after `<!-- profiles: example -->` in the usage page: run here as written."""
    text = (REPO / "docs/usage.md").read_text()
    found = re.search(r"<!-- profiles: example -->\n```toml\n(.*?)```\n", text, re.S)
    assert found, "docs/usage.md has no example marked profiles: example"
    return found.group(1)


def config(sinkhole_body: str = "sinkholed", sinkhole_address: str = SINKHOLE, left_alone: int = 8081) -> str:
    """The documented example, with the sinkhole's answers and port as given; one listener process:
    the reload record says when it answers anew."""
    example = (documented_example().replace('"sinkholed\\n"', f'"{sinkhole_body}\\n"')
               .replace(f'"{SINKHOLE}"', f'"{sinkhole_address}"').replace("[8081]", f"[{left_alone}]"))
    return "listener_processes = 1\n" + harness.config_text() + "\n[http]\nbody = \"everyone else\\n\"\n" \
        "bodies_dir = \"\"\n" + example


def dig(client, server: str = harness.DIV_CLIENT4) -> str:
    out = client.run("dig", "+tries=1", "+time=5", "+short", f"@{server}", "c2.example", "A").stdout
    return out.strip()


def curl(client, address: str, port: int = 80) -> str:
    proc = client.run("curl", "-sS", "-m", "10", "-H", "Host: c2.example", f"http://{address}:{port}/beacon",
                      check=False)
    return proc.stdout if proc.returncode == 0 else f"curl exit {proc.returncode}"


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

        div.config_path.write_text(config("sinkholed again", "198.51.100.81", 8082))
        div.proc.send_signal(signal.SIGHUP)
        done = div.wait_log(lambda r: r.get("event") == "reload", what="the reload record")
        assert "error" not in done, done
        assert dig(a) == "198.51.100.81" and dig(b) == C2
        assert curl(a, "198.51.100.81") == "sinkholed again\n"
        assert curl(b, C2) == "next stage\n"
        assert curl(a, SINKHOLE, 8081) == "sinkholed again\n"  # no longer left alone
        assert curl(a, SINKHOLE, 8082).startswith("curl exit")
        # Nothing restarted: the same run, the same table.
        assert div.alive() and harness.table_handle(lab.diverter_ns) == table
        assert "reload: " in div.stderr()
        questions = [r for r in div.log() if r.get("event") == "dns"]
        by_client = {(r["client_address"], r["answer"]) for r in questions}
        assert (harness.bridge_client(0), SINKHOLE) in by_client and (harness.bridge_client(1), C2) in by_client, \
            json.dumps(questions)[:2000]
        div.stop_and_check()
    finally:
        if div is not None:
            div.kill()
        harness.nftdivert(lab.diverter_ns, "remove", check=False)
        lab.close()
