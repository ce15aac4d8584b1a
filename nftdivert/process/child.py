"""Children that say when they are ready: the one way to start one and wait for it.

A child's first message on its pipe is ("ready",) or ("error", why). The
parent waits on that pipe and on a pidfd of the child, so a child that dies
while starting is known at once, without polling, and the error names it and
says how it ended. Whoever started it cleans up after a failure (it knows what
else to stop).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import select
from typing import Callable

from nftdivert.process.lifeline import die_with_parent, how_it_ended

READY = ("ready",)
_EXIT_SECONDS = 1.0  # the pipe closed as the child exits: how long its exit may take to show


class StartFailed(OSError):
    """A child did not come up: the reason, naming it."""


def spawn(name: str, target: Callable, *args):
    """Fork `target(conn, *args)` as a multiprocessing child called `name` that dies with us
    (SIGKILL); returns (the process, our end of `conn`). `target` sends READY or
    ("error", why) first. The caller closes the ends of other pipes it passed in `args`."""
    ctx = multiprocessing.get_context("fork")
    conn, child_end = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_run, args=(target, child_end, os.getpid(), args), name=name, daemon=True)
    process.start()
    child_end.close()
    return process, conn


def _run(target: Callable, conn, parent: int, args: tuple) -> None:
    die_with_parent(parent)
    target(conn, *args)


def wait_ready(name: str, conn, pid: int, timeout: float) -> None:
    """Until the child `pid` sends READY on `conn`; raises StartFailed if it sends an error,
    ends first, or says nothing within `timeout` seconds. It stays unreaped."""
    pidfd = os.pidfd_open(pid)
    try:
        ready = multiprocessing.connection.wait([conn, pidfd], timeout)
        if conn in ready:
            try:
                first = conn.recv()
            except EOFError:
                first = None
            if first == READY:
                return
            if first is not None:
                raise StartFailed(first[1])
        elif not ready:
            raise StartFailed(f"{name} (pid {pid}) did not come up within {timeout:g} s")
        select.select([pidfd], [], [], _EXIT_SECONDS)
        raise StartFailed(f"{name} {ended(pid)} while starting")
    finally:
        os.close(pidfd)


def ended(pid: int) -> str:
    """How the child `pid` ended, "(pid N) exited with status 1", leaving it to be reaped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        info = None
    if info is None:  # not yet gone
        return f"(pid {pid}) closed its pipe"
    return f"(pid {pid}) {how_it_ended(info.si_status if info.si_code == os.CLD_EXITED else -info.si_status)}"
