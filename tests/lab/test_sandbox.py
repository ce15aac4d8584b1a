"""`nftdivert sandbox -- CMD` on the real kernel: answered, logged, and gone afterwards.

The queue backend comes from NFTDIVERT_TEST_BACKEND, as in the e2e suites.
Each sandbox's own names (nds<its pid>-...) are checked, so sandboxes that
other test runs start meanwhile do not matter.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
from conftest import REPO, nftdivert_argv
from procs import descendants, running, wait_gone
from nftdivert.lab import sandbox as sandbox_mod
from nftdivert.lab import netns as netns_mod

pytestmark = pytest.mark.kernel


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SUDO_UID", None)
    env.pop("SUDO_GID", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sandbox") / "sandbox.toml"
    path.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n')
    return str(path)


def argv(config: str, *args: str) -> list[str]:
    return nftdivert_argv("sandbox", "-c", config, *args)


def leftovers(pid: int) -> list[str]:
    """What of the sandbox run by `pid` still exists: namespaces, resolv.conf, lock."""
    base = f"nds{pid}"
    paths = [netns_mod.NETNS_DIR / f"{base}-client", netns_mod.NETNS_DIR / f"{base}-divert",
             netns_mod.ETC_NETNS / f"{base}-client", sandbox_mod.LOCKS / f"{base}.lock"]
    return [str(p) for p in paths if p.exists()]


def sandbox(config: str, script: str, *args: str, timeout: float = 90, **env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv(config, *args, "--", "sh", "-c", script), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(**env))
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not leftovers(proc.pid), f"the sandbox left {leftovers(proc.pid)} behind\n{err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def log_records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def start(config: str, script: str) -> subprocess.Popen:
    """A sandbox running `script` in the background, once the script has said `ready`."""
    proc = subprocess.Popen(argv(config, "--log", "", "--", "sh", "-c", script),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    if not select.select([proc.stdout], [], [], 60)[0] or proc.stdout.readline() != b"ready\n":
        proc.kill()
        proc.wait()
        raise AssertionError(f"the sandbox did not start CMD: {proc.stderr.read().decode()}")
    return proc


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# ---- what CMD gets ----------------------------------------------------------------------

def test_origin_scenario_is_answered_and_logged_and_status_is_cmds(config):
    proc = sandbox(config, "echo fdsa | nc -q1 -w5 198.51.100.7 45678; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert "fdsa" in proc.stdout
    conv = [r for r in log_records(proc.stdout) if r.get("protocol") == "tcp"]
    assert conv and conv[0]["original_destination"] == "198.51.100.7:45678"
    assert "removing the ruleset" in proc.stderr
    if harness.BACKEND != "auto":
        assert f"queue backend {harness.BACKEND}" in proc.stderr, proc.stderr


@pytest.mark.any_backend
def test_the_pcap_holds_what_cmd_sent_and_got_on_its_veth_once(config, tmp_path):
    pcap = tmp_path / "sandbox.pcap"
    proc = sandbox(config, "curl -sS -4 --max-time 10 -o /dev/null http://anything.example:8080/ && "
                           "ping -c1 -W5 198.51.100.7 >/dev/null && ping -6 -c1 -W5 2001:db8::7 >/dev/null",
                   "-w", str(pcap), "--log", "")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"log lines 0\b", proc.stderr), proc.stderr  # no log: its DNS questions were not counted
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "ipv6.src",
                          "-e", "ip.dst", "-e", "ipv6.dst", "-e", "_ws.col.Protocol",
                          "-e", "tcp.seq_raw", "-e", "tcp.ack_raw", "-e", "tcp.flags", "-e", "dns.id",
                          "-e", "icmp.seq", "-e", "icmpv6.echo.sequence_number"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [tuple(line.split("\t")) for line in out.splitlines()]
    assert rows and len(set(rows)) == len(rows), "a packet is in the pcap twice:\n" + out
    cmd = (sandbox_mod.CLIENT_V4, sandbox_mod.CLIENT_V6)
    assert all((r[0] or r[1] in cmd) != (r[2] or r[3] in cmd) for r in rows), out  # CMD on one side, always
    sent = {(r[2] or r[3], r[4]) for r in rows if (r[0] or r[1]) in cmd}
    got = {(r[0] or r[1], r[4]) for r in rows if (r[2] or r[3]) in cmd}
    # The resolver is the diverter's own address: answered here, so in the capture too.
    for far in ((sandbox_mod.DIVERTER_V4, "DNS"), ("198.51.100.7", "ICMP"), ("2001:db8::7", "ICMPv6")):
        assert far in sent and far in got, f"{far} missing:\n{out}"
    web = {a for a, p in sent if p == "HTTP"}
    assert len(web) == 1 and next(iter(web)).startswith("198.18."), out  # the name's pool address, as asked


def test_names_resolve_and_the_log_ties_the_name_to_the_conversation(config):
    proc = sandbox(config, "curl -sS -4 --max-time 10 http://anything.example:8080/probe")
    assert proc.returncode == 0, proc.stderr
    assert "<h1>Welcome</h1>" in proc.stdout
    recs = log_records(proc.stdout)
    assert any(r.get("event") == "dns" and r["name"] == "anything.example" and r["type"] == "A" for r in recs)
    conv = [r for r in recs if r.get("protocol") == "tcp"]
    assert conv and conv[0]["name"] == "anything.example"
    assert conv[0]["original_destination"].endswith(":8080")


def nmap_open_ports(stdout: str) -> set[int]:
    """The ports `nmap -oG -` says are open."""
    found = re.findall(r"(\d+)/open/tcp", stdout)
    return {int(p) for p in found}


# A scanner that never retransmits: a sandbox has one client, so no
# admission limit drops its SYNs; every port is answered and logged.
@pytest.mark.load
def test_a_fast_scan_finds_every_port_open_and_the_log_holds_every_destination(config):
    # Never a retransmission; but on a loaded machine an answer may come late: nmap waits for it
    # (a late answer is not a lost one, and would call an open port filtered). Its report goes to
    # a file: on the log's stdout, a record written in the middle of its one long line cut both.
    report = Path(config).parent / "nmap.txt"
    proc = sandbox(config, f"nmap -n -sT -Pn -p 1-1000 --max-retries 0 --min-rtt-timeout 2s -oG {report} "
                           "203.0.113.30 >/dev/null", timeout=180)
    assert proc.returncode == 0, proc.stderr
    opened = nmap_open_ports(report.read_text())
    asked = {r["original_destination"] for r in log_records(proc.stdout)
             if r.get("event") == "start" and r["original_destination"].startswith("203.0.113.30:")}
    print(f"\nnmap: {len(opened)} open; the log: {len(asked)} destinations")
    assert len(opened) == 1000, sorted(set(range(1, 1001)) - opened)
    missing = sorted({f"203.0.113.30:{p}" for p in range(1, 1001)} - asked)
    assert not missing, (missing[:20], proc.stderr[-1500:])
    assert "admission dropped" not in proc.stderr, proc.stderr


def test_ipv6_inside_the_sandbox(config):
    proc = sandbox(config, "curl -sS -6 --max-time 10 http://v6only.example:9090/ && "
                           "echo six | nc -q1 -w5 2001:db8:ffff::7 45678")
    assert proc.returncode == 0, proc.stderr
    assert "six" in proc.stdout
    conv = [r for r in log_records(proc.stdout) if r.get("protocol") == "tcp"]
    assert {r["original_destination"] for r in conv} >= {"[2001:db8:ffff::7]:45678"}


# The first connection in a fresh sandbox must not wait for the link: it
# used to take a SYN retransmission, one second. Each try is a new sandbox.
FIRST_V6 = """python3 -c '
import socket, time
t = time.monotonic()
with socket.create_connection(("2001:db8:ffff::7", 45678), timeout=10) as s:
    s.sendall(b"x"); s.recv(1)
print("first", time.monotonic() - t)
'"""


def test_the_first_ipv6_connection_in_a_fresh_sandbox_does_not_wait(config):
    seconds = []
    for _ in range(3):
        proc = sandbox(config, FIRST_V6, "--log", "")
        assert proc.returncode == 0, proc.stderr
        seconds.append(float(re.search(r"first ([\d.]+)", proc.stdout)[1]))
        if seconds[-1] < 0.1:
            break
    assert min(seconds) < 0.1, f"first IPv6 connection took {seconds} s"


def test_the_sandbox_link_carries_ipv6_as_soon_as_it_exists():
    # The same, without the diverter's start-up time to hide it: a ping right
    # after create() got its answer after one second (the first one was lost).
    lab_ = sandbox_mod.create(f"ndt-link-{os.getpid()}", ipv6=True)
    try:
        ping = subprocess.run(["ip", "netns", "exec", lab_.client, "ping", "-6", "-c1", "-W5",
                               sandbox_mod.DIVERTER_V6], capture_output=True, text=True, timeout=30)
    finally:
        sandbox_mod.destroy(lab_)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert float(re.search(r"time=([\d.]+) ms", ping.stdout)[1]) < 100, ping.stdout


def test_cmd_runs_as_the_invoking_user_behind_sudo(config):
    proc = sandbox(config, "id -u; id -g", SUDO_UID="65534", SUDO_GID="65534")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:2] == ["65534", "65534"]


def test_the_client_has_no_route_but_the_sandbox_link(config):
    # Nothing can leak: the client's only way anywhere is the diverter, whose
    # forward chain drops (the e2e suite proves that with an "internet" host).
    proc = sandbox(config, "ip route; ip -6 route")
    routes = proc.stdout
    assert "default via 169.254.53.1" in routes
    assert all(("169.254.53." in line or "fd6e:6476::" in line or "fe80::" in line)
               for line in routes.splitlines() if line.strip())


# ---- lifetime ------------------------------------------------------------------------------

def test_a_diverter_that_cannot_start_is_named_with_how_it_ended_and_everything_is_removed(config):
    # A capture file that takes nothing stops the diverter as it starts: CMD never runs.
    proc = sandbox(config, "echo ran", "-w", "/dev/full", "--log", "")
    assert proc.returncode == 1, proc.stderr
    assert "ran" not in proc.stdout
    lines = proc.stderr.splitlines()
    assert "nftdivert: diverter failed: cannot write the capture /dev/full: No space left on device" in lines
    assert re.fullmatch(r"nftdivert: the diverter \(pid \d+\) exited with status 1 while starting "
                        r"\(see its messages above\)", lines[-1]), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_crashing_cmd_gives_its_signal_status_and_everything_is_removed(config):
    proc = sandbox(config, "kill -SEGV $$")  # sandbox() checks that nothing is left
    assert proc.returncode == 128 + signal.SIGSEGV


@pytest.mark.parametrize("detach", ["(sleep 2; curl -sS -4 --max-time 10 http://late.example/) &",
                                    "setsid -f sh -c 'sleep 2; curl -sS -4 --max-time 10 http://late.example/'"])
def test_a_daemonizing_cmd_is_observed_until_everything_it_started_has_exited(config, detach):
    began = time.monotonic()
    proc = sandbox(config, f"{detach}\nexit 3")
    assert proc.returncode == 3, proc.stderr  # CMD's own status, not its daemon's
    assert time.monotonic() - began > 2
    assert "CMD exited with status 3; the sandbox waits for what it started" in proc.stderr, proc.stderr
    assert re.search(r"nftdivert:   pid \d+: sleep 2\n", proc.stderr), proc.stderr
    conv = [r for r in log_records(proc.stdout) if r.get("protocol") == "tcp"]
    assert conv and conv[0]["name"] == "late.example", proc.stdout
    assert "<h1>Welcome</h1>" in proc.stdout  # the built-in HTTP answer reached curl


def test_inside_pids_are_the_sandbox_own_and_proc_shows_only_its_processes(config):
    # Until the child has become `sleep` (right after the fork it is still `sh`): the event, not a time.
    proc = sandbox(config, 'sleep 30 & echo "started $!"; until found=$(pgrep -x sleep); do :; done; '
                           'echo "found $found"; kill $!; echo "processes $(ls /proc | grep -c "^[0-9]")"')
    assert proc.returncode == 0, proc.stderr
    said = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(("started", "found",
                                                                                             "processes")))
    assert said["found"] == said["started"], proc.stdout  # `kill $(pgrep x)` inside hits what it means
    assert int(said["processes"]) < 10, proc.stdout  # the init, sh and a few: not the host's processes


def test_timeout_ends_the_whole_tree_with_status_124_and_removes_everything(config):
    # A daemon in a session of its own that ignores SIGTERM: it takes SIGKILL.
    daemon, cmd = f"sleep 61.{os.getpid()}", f"sleep 62.{os.getpid()}"  # names no other run uses
    began = time.monotonic()
    proc = sandbox(config, f"setsid -f sh -c 'trap \"\" TERM; {daemon}'; {cmd}", "--timeout", "2")
    assert proc.returncode == sandbox_mod.TIMED_OUT, proc.stderr
    assert time.monotonic() - began < 60
    assert "--timeout 2 s reached: ending the sandbox" in proc.stderr
    assert daemon in proc.stderr and cmd in proc.stderr
    for sleeper in (daemon, cmd):
        assert not subprocess.run(["pgrep", "-f", sleeper], capture_output=True).stdout, f"{sleeper} survived"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_timeout_must_be_a_positive_number_of_seconds(config, value):
    proc = subprocess.run(argv(config, f"--timeout={value}", "--", "true"), capture_output=True, text=True,
                          timeout=60, env=_env())
    assert proc.returncode == 2
    assert proc.stderr == f"nftdivert: bad config: --timeout = '{value}': must be a positive number of seconds\n"


def test_sigterm_to_the_sandbox_removes_everything(config):
    proc = start(config, "echo ready; exec sleep 60")
    tree = descendants(proc.pid)
    assert stop(proc) == 128 + signal.SIGTERM
    assert not running(tree)
    assert not leftovers(proc.pid)


def test_sigkill_leaves_no_orphan_and_the_next_sandbox_removes_the_rest(config):
    live = start(config, "echo ready; exec sleep 60")  # another sandbox, alive throughout: it must stay whole
    try:
        killed = start(config, "setsid -f sleep 60; echo ready; exec sleep 60")
        tree = descendants(killed.pid)
        assert len(tree) >= 5, tree  # the diverter, its listeners, the init, two sleeps
        netns = os.stat(netns_mod.NETNS_DIR / f"nds{killed.pid}-divert").st_ino
        # The diverter's counters and its table's ownership lock.
        stats = [*sandbox_mod.STATS_DIR.glob(f"*-{netns}.json"), *sandbox_mod.STATS_DIR.glob(f"*-{netns}.lock")]
        assert len(stats) == 2, stats
        killed.kill()
        assert not (left := wait_gone(tree, 1.0)), f"outlived the sandbox by more than a second: {left}"
        stop(killed)
        stale = leftovers(killed.pid)
        assert stale, "a SIGKILLed sandbox cannot have removed its namespaces"

        after = sandbox(config, "true")
        assert after.returncode == 0, after.stderr
        assert re.search(rf"removed what killed sandboxes left behind: .*\bnds{killed.pid}\b", after.stderr)
        assert not leftovers(killed.pid), f"left after the next start: {leftovers(killed.pid)}"
        assert not any(path.exists() for path in stats)
        assert len(leftovers(live.pid)) == 4, "the next start touched a live sandbox"
        assert live.poll() is None
    finally:
        assert stop(live) == 128 + signal.SIGTERM
    assert not leftovers(live.pid)
