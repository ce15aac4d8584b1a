"""CPU time of the processes that serve a side, from /proc, sampled around a phase.

utime + stime in /proc/<pid>/stat count every thread of a process, live or
exited, so one read covers `nftdivert run`'s queue worker (its main thread)
and its other threads. Child processes are found through
/proc/<pid>/task/*/children and counted apart: the listener process (the one
holding the listening socket of the echo port) and the others (the observer,
the capture reader), each with its own descendants.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
TCP_LISTEN = "0A"  # the socket state in /proc/net/tcp


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return kids


def tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    out = [pid]
    for kid in children(pid):
        out += tree(kid)
    return out


def listening_inodes(pid: int, ports: set[int], udp: bool = False) -> set[str]:
    """Inodes of TCP sockets listening on `ports` (and with `udp`, UDP sockets bound
    there) in the process's network namespace."""
    inodes = set()
    for name in ("tcp", "tcp6", *(("udp", "udp6") if udp else ())):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if (name.startswith("udp") or f[3] == TCP_LISTEN) and int(f[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(f[9])
    return inodes


def holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


class Processes:
    """Named groups of processes whose CPU time is sampled together."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    @classmethod
    def of_run(cls, pid: int, port: int) -> Processes:
        """`nftdivert run`: its own process (`worker`), the child serving `port` (`listener`), the others."""
        inodes = listening_inodes(pid, {port})
        groups: dict[str, list[int]] = {"worker": [pid], "listener": [], "others": []}
        for kid in children(pid):
            groups["listener" if holds_socket(kid, inodes) else "others"] += tree(kid)
        return cls(groups)

    def sample(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 3) for k in before}
