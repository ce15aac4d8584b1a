"""`nftdivert sandbox -- CMD` on the real kernel: answered, logged, and gone afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, nftdivert_argv
from nftdivert import sandbox as sandbox_mod

pytestmark = pytest.mark.kernel


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    env.pop("SUDO_UID", None)
    env.pop("SUDO_GID", None)
    env.update(extra)
    return env


def _sandbox_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("nds")]


def sandbox(script: str, *args: str, timeout: float = 90, **env) -> subprocess.CompletedProcess:
    before = set(_sandbox_namespaces())
    proc = subprocess.run(nftdivert_argv("sandbox", *args, "--", "sh", "-c", script),
                          capture_output=True, text=True, timeout=timeout, env=_env(**env))
    assert set(_sandbox_namespaces()) <= before, "the sandbox left namespaces behind"
    return proc


def log_records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_origin_scenario_is_answered_and_logged_and_status_is_cmds():
    proc = sandbox("echo fdsa | nc -q1 -w5 198.51.100.7 45678; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert "fdsa" in proc.stdout
    conv = [r for r in log_records(proc.stdout) if r.get("protocol") == "tcp"]
    assert conv and conv[0]["original_destination"] == "198.51.100.7:45678"
    assert "removing the ruleset" in proc.stderr


def test_names_resolve_and_the_log_ties_the_name_to_the_conversation():
    proc = sandbox("curl -sS -4 --max-time 10 http://anything.example:8080/probe")
    assert proc.returncode == 0, proc.stderr
    assert "<h1>Welcome</h1>" in proc.stdout
    recs = log_records(proc.stdout)
    assert any(r.get("event") == "dns" and r["name"] == "anything.example" and r["type"] == "A" for r in recs)
    conv = [r for r in recs if r.get("protocol") == "tcp"]
    assert conv and conv[0]["name"] == "anything.example"
    assert conv[0]["original_destination"].endswith(":8080")


def test_ipv6_inside_the_sandbox():
    proc = sandbox("curl -sS -6 --max-time 10 http://v6only.example:9090/ && "
                   "echo six | nc -q1 -w5 2001:db8:ffff::7 45678")
    assert proc.returncode == 0, proc.stderr
    assert "six" in proc.stdout
    conv = [r for r in log_records(proc.stdout) if r.get("protocol") == "tcp"]
    assert {r["original_destination"] for r in conv} >= {"[2001:db8:ffff::7]:45678"}


def test_cmd_runs_as_the_invoking_user_behind_sudo():
    proc = sandbox("id -u; id -g", SUDO_UID="65534", SUDO_GID="65534")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["65534", "65534"]


def test_a_crashing_cmd_gives_its_signal_status_and_everything_is_removed():
    proc = sandbox("kill -SEGV $$")
    assert proc.returncode == 128 + signal.SIGSEGV
    assert not list(Path("/etc/netns").glob("nds*"))


def test_sigterm_to_the_sandbox_removes_everything():
    before = set(_sandbox_namespaces())
    proc = subprocess.Popen(nftdivert_argv("sandbox", "--", "sleep", "60.4242"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (set(_sandbox_namespaces()) - before):
            time.sleep(0.1)
        time.sleep(2)  # let the diverter come up, so there is something to clean
        assert set(_sandbox_namespaces()) - before, "the sandbox never made its namespaces"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert set(_sandbox_namespaces()) <= before
    assert not subprocess.run(["pgrep", "-f", "sleep 60.4242"], capture_output=True).stdout


def test_the_client_has_no_route_but_the_sandbox_link():
    # Nothing can leak: the client's only way anywhere is the diverter, whose
    # forward chain drops (the e2e suite proves that with an "internet" host).
    proc = sandbox("ip route; ip -6 route")
    routes = proc.stdout
    assert "default via 169.254.53.1" in routes
    assert all(("169.254.53." in line or "fd6e:6476::" in line or "fe80::" in line)
               for line in routes.splitlines() if line.strip())


def test_the_sandbox_link_carries_ipv6_as_soon_as_it_exists():
    # A ping right after create() got its answer after one second (the first
    # one was lost): so did the first IPv6 connection in a fresh sandbox.
    lab_ = sandbox_mod.create(f"ndt-link-{os.getpid()}", ipv6=True)
    try:
        ping = subprocess.run(["ip", "netns", "exec", lab_.client, "ping", "-6", "-c1", "-W5",
                               sandbox_mod.DIVERTER_V6], capture_output=True, text=True, timeout=30)
    finally:
        sandbox_mod.destroy(lab_)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert float(re.search(r"time=([\d.]+) ms", ping.stdout)[1]) < 100, ping.stdout
