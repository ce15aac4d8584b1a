"""Children die with their parent, also when it died before the child could ask for that."""

from __future__ import annotations

import os
import signal

from nftdivert.process.lifeline import die_with_parent
from procs import wait_gone


def _in_child(body) -> int:
    """Run `body` in a forked child; its exit status (0 if it returned)."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os._exit(0)
        finally:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_child_whose_parent_is_alive_carries_on():
    parent = os.getpid()
    r, w = os.pipe()
    try:
        assert _in_child(lambda: die_with_parent(parent)) == 0
        assert _in_child(lambda: die_with_parent(lifeline=r)) == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_child_whose_parent_died_before_it_asked_leaves_at_once():
    # The parent it was forked by is not its parent any more (it was reparented).
    assert _in_child(lambda: die_with_parent(-1)) == 1
    # In a new PID namespace: nobody holds the lifeline's write end any more.
    r, w = os.pipe()
    os.close(w)
    try:
        assert _in_child(lambda: die_with_parent(lifeline=r)) == 1
    finally:
        os.close(r)


def test_a_child_dies_when_its_parent_is_killed():
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:  # forks the child, says its pid, waits to be killed
        try:
            os.close(r)
            me = os.getpid()
            child = os.fork()
            if child == 0:
                die_with_parent(me)
                signal.pause()
            os.write(w, f"{child} {open(f'/proc/{child}/stat').read().rsplit(')', 1)[1].split()[19]}".encode())
            signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    child, start = map(int, os.read(r, 100).split())
    os.close(r)
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    assert not wait_gone({child: start}, 1.0), "the child outlived its parent by more than a second"
