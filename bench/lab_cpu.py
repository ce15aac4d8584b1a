"""The lab row's processes: which of `nftdivert run`'s children is which, their
CPU time, on which cores it was spent, and their memory.

Found from the run's process tree (cpu.py) and what each child holds:

  listener  a socket bound to a listener's port (TCP listening, or UDP)
  observer  a NETLINK_NETFILTER socket subscribed to multicast groups
            (conntrack's events)
  capture   another NETLINK_NETFILTER socket (nflog, bound by a command)

`run`'s own process is the queue worker and its threads. Every listener
process is reported on its own, so a run with several shows each.

The cores: a sampler reads /proc/PID/task/TID/stat every SAMPLE_SECONDS and
puts each thread's CPU time since the last sample on the core it last ran
on (the `processor` field). A thread that moved within an interval is
counted on the later core: an estimate, good at this sampling rate for
where the time went.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import cpu

SAMPLE_SECONDS = 0.1
NETLINK_NETFILTER = 12


def _netfilter_inodes(pid: int) -> tuple[set[str], set[str]]:
    """NETLINK_NETFILTER socket inodes: (subscribed to groups, not)."""
    subscribed, other = set(), set()
    try:
        lines = Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]
    except OSError:
        return subscribed, other
    for line in lines:
        f = line.split()  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        if int(f[1]) == NETLINK_NETFILTER:
            (subscribed if int(f[3], 16) else other).add(f[9])
    return subscribed, other


def classify(run_pid: int, ports: set[int], workers: list[int] = ()) -> dict[str, list[int]]:
    """label -> pids (a child with its descendants): `run`, `worker N` (the queue workers: `workers`,
    as the run names them), `listener N`, `observer`, `capture`, `other N`."""
    bound = cpu.listening_inodes(run_pid, ports, udp=True)
    subscribed, other_nf = _netfilter_inodes(run_pid)
    groups: dict[str, list[int]] = {"run": [run_pid]}
    listeners = others = 0
    for kid in sorted(cpu.children(run_pid)):
        if kid in workers:
            label = f"worker {list(workers).index(kid)}"
        elif cpu.holds_socket(kid, bound):
            listeners += 1
            label = f"listener {listeners}"
        elif cpu.holds_socket(kid, subscribed):
            label = "observer"
        elif cpu.holds_socket(kid, other_nf):
            label = "capture"
        else:
            others += 1
            label = f"other {others}"
        groups[label] = cpu.tree(kid)
    return groups


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def machine_busy() -> dict[int, tuple[int, int]]:
    """Per core, from /proc/stat: (busy ticks, all ticks). The whole machine's, whoever used them."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu":
            t = [int(x) for x in ticks]
            idle = t[3] + t[4]  # idle, iowait
            out[int(name[3:])] = (sum(t[:8]) - idle, sum(t[:8]))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Each core's busy share between two machine_busy() samples."""
    return {c: round((after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]), 3) for c in after if c in before}


def _threads(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (utime+stime in ticks, the core it last ran on)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        f = text[text.rindex(")") + 2:].split()
        out[int(tid)] = (int(f[11]) + int(f[12]), int(f[36]))
    return out


class CoreSampler:
    """Each group's CPU seconds per core, sampled in a thread of the benchmark while a phase runs."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.per_core: dict[str, dict[int, float]] = {g: {} for g in groups}
        self._last: dict[int, int] = {}  # tid -> ticks at the last sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lab-cores", daemon=True)

    def _sample(self) -> None:
        for label, pids in self.groups.items():
            cores = self.per_core[label]
            for pid in pids:
                for tid, (ticks, core) in _threads(pid).items():
                    before = self._last.get(tid)
                    self._last[tid] = ticks
                    if before is not None and ticks > before:
                        cores[core] = cores.get(core, 0.0) + (ticks - before) / cpu.TICK

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._sample()

    def start(self) -> None:
        self._sample()  # the baseline
        self._thread.start()

    def stop(self) -> dict[str, dict[int, float]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {g: {c: round(s, 2) for c, s in sorted(cores.items())} for g, cores in self.per_core.items()}
