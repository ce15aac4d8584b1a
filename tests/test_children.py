"""What stops `nftdivert run` by itself: a child process that dies (the listeners,
the observer, the capture's reader) or a log that cannot be written. Each fails
closed first (no conversation answered that the log misses), then stops: the
final counters, one line saying why, exit 1, nothing left but containment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

import harness
import procs
from conftest import nftdivert_argv
from test_runner import host  # noqa: F401 - the fixture: one host in local mode

pytestmark = pytest.mark.kernel


def _children(host, div: harness.Diverter) -> list[int]:
    """The run's children: its listener processes in the order forked (the DNS owner first;
    one per usable CPU by default), then the observer. The listeners' processes are the
    ones holding the listener's socket; the queue workers (one per CPU too, when more
    than one) are forked before them."""
    below = procs.descendants(div.proc.pid)
    ss = host.run("ss", "-Hltnp", f"sport = :{harness.LISTENER_PORT}").stdout
    holders = sorted({int(pid) for pid in re.findall(r"pid=(\d+)", ss)} & set(below), key=below.get)
    workers = sorted(below, key=below.get)[:_workers()]
    assert len(holders) == len(os.sched_getaffinity(0)) and len(below) == len(holders) + len(workers) + 1, \
        (ss, below)
    return [*holders, next(pid for pid in below if pid not in holders and pid not in workers)]


def _workers() -> int:
    """The queue worker processes a default run has: none apart from the run itself with one."""
    return harness.WORKERS if harness.WORKERS > 1 else 0


def _stopped_by_itself(div: harness.Diverter, why: str) -> str:
    """The run ended by itself with exit 1: the final counters, then the one line saying why."""
    assert div.proc.wait(timeout=60) == 1, div.stderr()
    err = div.stderr()
    lines = err.splitlines()
    assert re.fullmatch(rf"nftdivert: {why}", lines[-1]), err
    counters = "nftdivert: kernel path: new conversations" if harness.KERNEL_PATH else "nftdivert: packets seen"
    assert lines[-2].startswith(counters), err
    assert "Traceback" not in err
    return err


def _assert_every_start_has_its_end(log: list[dict]) -> None:
    starts = {r["id"] for r in log if r["event"] == "start"}
    ends = {r["id"] for r in log if r["event"] == "end"}
    assert starts and starts <= ends, f"starts without an end: {starts - ends}"


def _start(host, tmp_path, *args: str) -> harness.Diverter:
    return harness.Diverter(host, tmp_path, harness.config_text(mode="local"), name="children", args=args).start()


def _client_loop(host, first_port: int) -> subprocess.Popen:
    argv, env = harness._client("loop", "198.51.100.70", str(first_port))
    return host.popen(*argv, env=env, text=True)


def _answered_before(loop: subprocess.Popen, count: int) -> list[dict]:
    """Read the loop's lines until `count` conversations were answered."""
    seen = []
    while sum(r["ok"] for r in seen) < count:
        line = loop.stdout.readline()
        assert line, f"the client loop ended early: {seen} {loop.stderr.read()}"
        seen.append(json.loads(line))
    return seen


def _logged(log: list[dict], answered: list[dict]) -> list[dict]:
    """Those answered conversations that have no start record (client port and destination)."""
    started = {(r["client"].rsplit(":", 1)[1], r["original_destination"]) for r in log if r["event"] == "start"}
    return [r for r in answered if (str(r["local"][1]), f"198.51.100.70:{r['port']}") not in started]


def _kill_during_a_client_loop(host, div: harness.Diverter, first_port: int, which: int) -> tuple[int, list[dict]]:
    """kill -9 one of the run's children (0: the first listener process, -2: the last one, -1: the
    observer) while a client loop runs: (its pid, every conversation the client saw answered)."""
    pid = _children(host, div)[which]  # first: the kill follows the fifth answer at once
    loop = _client_loop(host, first_port)
    try:
        before = _answered_before(loop, 5)
        os.kill(pid, signal.SIGKILL)
        rest, _ = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:
            loop.kill()
    return pid, [r for r in before + [json.loads(line) for line in rest.splitlines()] if r["ok"]]


@pytest.mark.parametrize("which, child, rather", [
    # Before: the run went on, every new conversation refused and logged as a start,
    # `status` said loaded, and the listener process stayed a zombie.
    pytest.param(0, "the built-in listeners' process", "refuse every new conversation", id="listeners"),
    # Any one of several listener processes: its share of the connections would be refused.
    pytest.param(-2, "the built-in listeners' process", "refuse every new conversation", id="last-listeners"),
    # Before: the death was noticed at the next tick, half a second on: conversations
    # answered in between were never logged, nor the ends of those that were.
    pytest.param(-1, "the conversation observer", "answer conversations that would not be logged", id="observer"),
])
def test_a_dead_child_stops_the_run_at_once_and_nothing_answered_goes_unlogged(host, tmp_path, which, child,
                                                                                 rather):
    div = _start(host, tmp_path)
    pid, answered = _kill_during_a_client_loop(host, div, 20000 + 10000 * (which % 3), which)
    assert div.proc.wait(timeout=60) == 1, div.stderr()
    assert not (missing := _logged(div.log(), answered)), f"answered, never logged: {missing}" + div.stderr()
    _assert_every_start_has_its_end(div.log())
    _stopped_by_itself(div, rf"{child} \(pid {pid}\) was killed by SIGKILL: stopping, rather than {rather}")
    assert host.run("nft", "list", "ruleset").stdout == ""  # local mode: no containment to keep


def test_a_dead_capture_reader_stops_the_run_at_once(host, tmp_path):
    # Before: noticed at the next tick only, with "ended unexpectedly" for how.
    div = _start(host, tmp_path, "-w", str(tmp_path / "c.pcap"))
    below = procs.descendants(div.proc.pid)
    assert len(below) == 2 + len(os.sched_getaffinity(0)) + _workers(), below
    reader = min(below, key=below.get)  # forked first, before the listeners and the observer
    os.kill(reader, signal.SIGKILL)
    _stopped_by_itself(div, rf"the capture {tmp_path}/c.pcap stopped: its reader \(pid {reader}\) "
                            "was killed by SIGKILL")
    assert host.run("nft", "list", "ruleset").stdout == ""


class _TinyDisk:
    """An 8 KiB tmpfs on `where`, in a mount namespace of its own held by a sleeping
    process: only what runs in there sees it, and it goes with the holder."""

    def __init__(self, where: Path) -> None:
        where.mkdir()
        self.holder = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=8k hk-tiny "$0" && echo up && exec sleep 600',
             str(where)], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline() == "up\n"
        self.path = Path(f"/proc/{self.holder.pid}/root{where}")  # the holder's view of it

    def argv(self, *argv: str) -> list[str]:
        # -r -w: keep the holder's root and directory (entering a mount namespace resets both
        # to the namespace's own, which leaves a chroot: the fresh-root proof runs in one).
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-r", "-w", *argv]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


def test_a_log_that_fills_its_disk_stops_the_run_with_one_line_and_no_half_record(host, tmp_path):
    # Before: the run went on answering, only `status` counted the failures, the file
    # ended in half a line, and the stop failed with a bare "No space left on device".
    disk = _TinyDisk(tmp_path / "tiny")
    try:
        cfg = tmp_path / "tiny.toml"
        cfg.write_text(harness.config_text(mode="local"))
        log = str(tmp_path / "tiny" / "log.jsonl")
        proc = subprocess.Popen(disk.argv(*host.argv(*nftdivert_argv("run", "-c", str(cfg), "--log", log))),
                                env=harness._env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            harness.wait_for(lambda: harness.table_handle(host) is not None and harness.port_bound(host, "tcp", 1337), 30,
                         "nftdivert run to come up")
            loop = _client_loop(host, 40000)  # until the run stops: a few dozen records fill 8 KiB
            loop.communicate(timeout=120)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        text = (disk.path / "log.jsonl").read_text()
    finally:
        disk.close()
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert lines[-1] == (f"nftdivert: cannot write the conversation log {log}: No space left on device: "
                         "stopping, rather than answer conversations that would not be logged"), err
    assert "new conversations" in lines[-2] or "packets seen" in lines[-2], err
    assert "Traceback" not in err
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # whole records only
    assert host.run("nft", "list", "ruleset").stdout == ""
