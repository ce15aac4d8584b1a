"""Children that die with their parent, even when the parent gets SIGKILL.

PR_SET_PDEATHSIG asks the kernel for a SIGKILL when the parent goes. It is
set in the child, after fork, so a parent that died in between would never
send it: the child checks once more after setting it and leaves at once.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
from typing import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, lifeline: int | None = None,
                    signum: int = signal.SIGKILL) -> None:
    """Call first thing in a forked child.

    `parent`: the parent's pid, for a child in the parent's PID namespace.
    `lifeline`: the read end of a pipe whose write end only the parent holds,
    for a child in a new PID namespace (there, getppid() is 0): the pipe
    reads as closed once the parent is gone.
    `signum`: what the kernel sends; SIGTERM lets a writer (the capture's reader) finish its file.
    """
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum) != 0:
        os._exit(1)  # without it, a SIGKILLed parent would leave us behind
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if lifeline is not None and select.select([lifeline], [], [], 0)[0]:
        os._exit(1)


def fork_child(body: Callable[[], int], signum: int = signal.SIGKILL) -> int:
    """Fork a child that dies with us (`signum`), runs `body` and exits with what it returns
    (1 if it raises), never returning into the parent's code; returns its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        die_with_parent(parent, signum=signum)
        code = body()
    finally:
        os._exit(code)


def how_it_ended(exitcode: int | None) -> str:
    """What ended a child, from its exit code as multiprocessing and os.waitstatus_to_exitcode give it
    (negative: the signal that killed it)."""
    if exitcode is None:
        return "ended"
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def process_ended(process) -> str:
    """How a multiprocessing child that has ended did: "(pid N) was killed by SIGKILL". Reaps it."""
    process.join(1)
    return f"(pid {process.pid}) {how_it_ended(process.exitcode)}"
