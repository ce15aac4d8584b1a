"""End to end, when things go wrong: stopping, crashing, restarting, and what
diverted traffic meets while no worker runs (fail closed: nothing; fail open:
the kernel's own answer). The internet host must see nothing throughout.

Only fail closed and fail open depend on the queue backend (how each queues
with no worker bound: the native statement's bypass flag, or NFQUEUE's), so
only they run in the VM tier. Stopping, the ownership of the table and the
containment after a stop are the same code on both: any_backend."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.kernel


@pytest.fixture
def own_8080(gw):
    server = harness.serve_tcp(gw.diverter_ns, 8080, "own-8080")
    yield server
    server.kill()
    server.wait(timeout=5)


def _expected_xt_rules(backend: str) -> int:
    return {"xt": 4 * harness.WORKERS, "nft": 0, "none": 0}[backend]  # mangle INPUT + raw OUTPUT, per family and worker


@pytest.mark.any_backend
def test_sigterm_leaves_nothing(gw):
    div = gw.ensure()
    r = gw.udp("198.51.100.30", 3000, "before-sigterm")
    assert r["ok"], r
    assert bool(harness.queue_bindings(gw.diverter_ns)) != harness.KERNEL_PATH, "queues bound by the queue path only"
    pid = div.proc.pid
    gw.stop()  # SIGTERM; exit 0; no table, ruleset, xt rule, queue binding, process
    assert pid not in gw.diverter_ns.pids()
    assert "stopping: removing the ruleset" in div.stderr(), div.stderr()


@pytest.mark.any_backend
def test_kill9_then_run_again_replaces_the_stale_table(gw, tmp_path):
    div = gw.ensure()
    backend = harness.active_backend(gw.diverter_ns)
    stale = harness.table_handle(gw.diverter_ns)
    div.kill()
    assert harness.table_handle(gw.diverter_ns) == stale, "kill -9 cannot have removed the table"
    assert harness.queue_bindings(gw.diverter_ns) == [], "a dead worker's queues are unbound by the kernel"

    fresh = gw.start_over_stale()
    assert harness.table_handle(gw.diverter_ns) != stale
    assert len(harness.nfqueue_rules(gw.diverter_ns)) == _expected_xt_rules(backend), harness.nfqueue_rules(gw.diverter_ns)
    gw.assert_origin_scenario(fresh, tmp_path / "client.pcap")


@pytest.mark.any_backend
def test_kill9_after_an_active_ftp_transfer_the_next_run_removes_its_port_20_rule(gw):
    """Active FTP's data connection comes from the address asked for, port 20;
    a routing rule makes the client's answers to it local. A killed run cannot
    remove it: the next one does (and `remove`, which the fixture checks)."""
    div = gw.ensure()
    r = gw.client.run("curl", "-sS", "--max-time", "20", "--ftp-port", "-", "-o", "/dev/null",
                      "-w", "%{size_download}", "ftp://198.51.100.21/pub/stage2.exe", check=False, timeout=40)
    assert r.returncode == 0 and int(r.stdout or 0) > 0, r
    assert harness.port20_rules(gw.diverter_ns), "the active transfer added no rule: this proves nothing"
    div.kill()
    assert harness.port20_rules(gw.diverter_ns), "kill -9 cannot have removed the rule"
    gw.start_over_stale()
    assert harness.port20_rules(gw.diverter_ns) == []


def test_fail_closed_killed_worker_answers_nothing_and_leaks_nothing(gw):
    div = gw.ensure()
    div.kill()
    assert harness.table_handle(gw.diverter_ns) is not None
    if harness.KERNEL_PATH:  # the run renewed the serving set's elements; they expire without it
        harness.wait_for(lambda: not harness.set_elements(gw.diverter_ns, "serving"), 10,
                     "the serving set's elements to expire after the kill")
    tcp = gw.tcp("198.51.100.7", 45678, "nobody-home", timeout=2)
    assert not tcp["ok"] and "timed out" in tcp["error"], tcp
    udp = gw.udp("198.51.100.7", 45678, "nobody-home", timeout=1)
    assert not udp["ok"], udp
    gw.assert_no_leaks()
    left = harness.state_files(gw.diverter_ns)
    assert left, "the killed run's counters and lock: what `remove` must take"
    gw.stop()  # nftdivert remove: the stale table, xt rules and state files go (assert_clean checks)
    assert harness.table_handle(gw.diverter_ns) is None


def test_fail_open_killed_worker_lets_the_kernel_answer(gw, own_8080):
    div = gw.ensure(fail="open")
    harness.wait_bound_set(gw.diverter_ns, "tcp", 8080)
    div.kill()
    assert harness.table_handle(gw.diverter_ns) is not None

    refused = gw.tcp("198.51.100.7", 45678, "unbound", timeout=3)
    assert not refused["ok"] and "ConnectionRefusedError" in refused["error"], refused
    assert refused["seconds"] < 1.5, f"not an immediate RST: {refused}"
    own = gw.tcp("198.51.100.8", 8080, "bound")
    assert own["ok"] and own["reply"] == "own-8080" and own["peer"] == ["198.51.100.8", 8080], own
    gw.assert_no_leaks()
    gw.stop()
    assert harness.table_handle(gw.diverter_ns) is None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _nice(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[16])  # field 19, counted after the command name


def _listeners(pid: int, ns) -> int:
    """A child holding the listener's socket (one of several: one listener process per CPU)."""
    ss = ns.run("ss", "-Hltnp", f"sport = :{harness.LISTENER_PORT}").stdout
    held = sorted({int(p) for p in re.findall(r"pid=(\d+)", ss)} & set(_children(pid)))
    assert held, ss
    return held[-1]


@pytest.mark.any_backend  # the children are the same processes on both backends
@pytest.mark.parametrize("child, rather", [
    ("the conversation observer", "answer conversations that would not be logged"),
    ("the built-in listeners' process", "refuse every new conversation"),
])
def test_a_dead_child_stops_the_run_leaves_containment_and_nothing_more_is_answered(gw, child, rather):
    div = gw.ensure()
    assert gw.tcp("198.51.100.7", 45678, "logged")["ok"]
    if child == "the conversation observer":
        (pid,) = [c for c in _children(div.proc.pid) if _nice(c) == 19]  # it alone runs at nice 19
    else:
        pid = _listeners(div.proc.pid, gw.diverter_ns)
    os.kill(pid, signal.SIGKILL)
    assert div.proc.wait(timeout=30) == 1, div.stderr()
    said = f"nftdivert: {child} (pid {pid}) was killed by SIGKILL: stopping, rather than {rather}\n"
    assert div.stderr().endswith(said), div.stderr()
    harness.assert_contained(gw.diverter_ns)  # what a clean stop leaves
    after = gw.tcp("198.51.100.7", 45678, "not-logged", timeout=2)
    assert not after["ok"], after
    log = div.log()
    assert {r["id"] for r in log if r["event"] == "start"} <= {r["id"] for r in log if r["event"] == "end"}, log
    gw.assert_no_leaks()
    gw.stop()


@pytest.mark.any_backend
@pytest.mark.queue_path  # the kernel path has no queue worker
def test_a_dead_queue_worker_stops_the_run_and_leaves_no_queue_bound(gw):
    div = gw.ensure(workers=2)
    assert gw.tcp("198.51.100.7", 45678, "logged")["ok"]
    pids = re.search(r"2 queue workers \(pids (\d+), (\d+)\)", div.stderr())
    assert pids is not None, div.stderr()
    pid = int(pids[2])
    os.kill(pid, signal.SIGKILL)
    assert div.proc.wait(timeout=30) == 1, div.stderr()
    said = f"nftdivert: queue worker 1 (pid {pid}) was killed by SIGKILL: stopping, rather than leave its clients unanswered\n"
    assert div.stderr().endswith(said), div.stderr()
    harness.assert_contained(gw.diverter_ns)
    assert harness.queue_bindings(gw.diverter_ns) == [], "the other worker unbound its queues"
    assert not [p for p in (pids[1], pids[2]) if Path(f"/proc/{p}").exists()], "no worker left behind"
    log = div.log()
    assert {r["id"] for r in log if r["event"] == "start"} <= {r["id"] for r in log if r["event"] == "end"}, log
    gw.assert_no_leaks()
    gw.stop()


@pytest.mark.any_backend
@pytest.mark.queue_path  # the kernel path binds no queue
def test_second_run_on_taken_queues_fails_cleanly_and_leaves_the_first_alone(gw, tmp_path):
    gw.ensure()
    first = harness.table_handle(gw.diverter_ns)
    cfg = tmp_path / "second.toml"
    # Its own nflog group for admission's drops (the first run reads 1338): the queues are what clash.
    cfg.write_text(harness.DIVERT_PATH_LINE + f'table = "second"\n[queue]\nbackend = "{harness.BACKEND}"\n'
                   'admission_group = 1339\n[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 2000\n')
    proc = harness.nftdivert(gw.diverter_ns, "run", "-c", str(cfg), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "cannot bind queue.incoming = 0" in proc.stderr and "Traceback" not in proc.stderr
    assert harness.table_handle(gw.diverter_ns, "second") is None
    assert harness.table_handle(gw.diverter_ns) == first
    assert gw.tcp("198.51.100.7", 45678, "still-here")["reply"] == "still-here"


# ---- one table, one owner ---------------------------------------------------------------

OTHER = ('[queue]\nbackend = "{backend}"\nincoming = 10\noutgoing = 74\n'
         '[[listeners]]\nname = "tcp-other"\nprotocol = "tcp"\nport = 2337\n'
         '[[listeners]]\nname = "udp-other"\nprotocol = "udp"\nport = 2337\n')


@pytest.mark.any_backend
def test_a_second_run_for_a_live_runs_table_is_refused_and_the_first_keeps_it(gw, tmp_path):
    first = gw.ensure()
    handle = harness.table_handle(gw.diverter_ns)
    mine = f"worker: pid {first.proc.pid}:"
    harness.wait_for(lambda: mine in harness.nftdivert(gw.diverter_ns, "status").stdout, 30, "the first run's counters")
    cfg = tmp_path / "other.toml"
    cfg.write_text(harness.DIVERT_PATH_LINE + OTHER.format(backend=harness.BACKEND))

    second = harness.nftdivert(gw.diverter_ns, "run", "-c", str(cfg), check=False, timeout=30)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    assert (f"table inet {harness.TABLE} is owned by nftdivert run (pid {first.proc.pid}) "
            "in this network namespace") in second.stderr, second.stderr
    # apply with another ruleset is refused the same way; with the run's own, it reloads.
    applied = harness.nftdivert(gw.diverter_ns, "apply", "-c", str(cfg), check=False)
    assert applied.returncode == 1 and f"pid {first.proc.pid}" in applied.stderr, applied.stderr
    assert harness.table_handle(gw.diverter_ns) == handle

    assert not harness.port_bound(gw.diverter_ns, "tcp", 2337)
    assert mine in harness.nftdivert(gw.diverter_ns, "status").stdout  # its status file is still its own
    r = gw.tcp("198.51.100.7", 45678, "still-diverted")
    assert r["ok"] and r["reply"] == "still-diverted", r
    harness.nftdivert(gw.diverter_ns, "apply", "-c", str(first.config_path))
    r = gw.tcp("198.51.100.7", 45679, "after-reapply")
    assert r["ok"] and r["reply"] == "after-reapply", r
    gw.stop()  # the first stops cleanly: its containment stays, `remove` then leaves nothing
    gw.assert_no_leaks()


# ---- after a clean stop -----------------------------------------------------------------

@pytest.mark.any_backend
def test_a_clean_stop_keeps_containment_until_remove(gw, tmp_path):
    div = gw.ensure()
    div.stop_and_check()  # exit 0; the table holds the containment chain alone
    assert "containment stays: table inet nftdivert" in div.stderr(), div.stderr()
    gw.div = None
    ns = gw.diverter_ns

    status = harness.nftdivert(ns, "status")
    assert f"table inet {harness.TABLE}: contained, no worker" in status.stdout, status.stdout
    assert "worker: none running" in status.stdout
    assert harness.nftdivert(ns, "diff", "-c", str(div.config_path), "--after-stop").returncode == 0
    drift = harness.nftdivert(ns, "diff", "-c", str(div.config_path), check=False)
    assert drift.returncode == 1 and "compare with --after-stop" in drift.stderr, drift.stderr
    rendered = harness.nftdivert(ns, "render", "-c", str(div.config_path), "--after-stop").stdout
    assert "chain contain {" in rendered and "divert_incoming" not in rendered

    # The gateway still forwards nothing: nothing answers, nothing reaches the host behind.
    probes = [gw.udp("198.51.100.77", 9999, "after-stop", timeout=1),
              gw.tcp("198.51.100.77", 45678, "after-stop", timeout=1), gw.tcp(harness.INET4, 22, "x", timeout=1)]
    assert not any(p["ok"] for p in probes), probes
    gw.assert_no_leaks()

    removed = harness.nftdivert(ns, "remove").stdout
    assert f"removed table inet {harness.TABLE}" in removed
    harness.assert_clean(ns)


@pytest.mark.any_backend
def test_a_clean_stop_with_after_stop_remove_leaves_nothing(gw):
    div = gw.ensure(after_stop="remove")
    pid = div.proc.pid
    assert div.stop() == 0, div.stderr()
    gw.div = None
    assert pid not in gw.diverter_ns.pids()
    harness.assert_clean(gw.diverter_ns)
    assert "containment stays" not in div.stderr()
