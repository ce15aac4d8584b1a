"""Processes as the host sees them: a tree below a pid, and which of it still runs."""

from __future__ import annotations

import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`: pid -> start time (which tells a reused pid apart)."""
    found, todo = {}, [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
            for child in children:
                if (st := _stat(child)) is not None:
                    found[child] = st[1]
                    todo.append(child)
    return found


def running(procs: dict[int, int]) -> list[int]:
    """Those of `procs` that still run (a zombie has ended: only its exit status waits)."""
    return [pid for pid, start in procs.items() if (st := _stat(pid)) and st[1] == start and st[0] != "Z"]


def wait_gone(procs: dict[int, int], seconds: float) -> list[int]:
    """Those of `procs` still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while running(procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    return running(procs)
