"""Starting a child and waiting for its ready: what a failure says, and that it says it at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from nftdivert.process.child import READY, StartFailed, spawn, wait_ready
from nftdivert.process.lifeline import fork_child

LONG = 60.0  # a wait for ready that must end long before this


def _started(target):
    process, conn = spawn("nftdivert-probe", target)
    return process, conn


def _stop(process, conn) -> None:
    if process.is_alive():
        process.kill()
    process.join()
    conn.close()


def test_a_child_that_says_ready_is_left_running():
    stop_r, stop_w = os.pipe()

    def ready(conn):
        conn.send(READY)
        os.read(stop_r, 1)

    process, conn = _started(ready)
    try:
        wait_ready("the probe", conn, process.pid, LONG)
        assert process.is_alive()
    finally:
        os.write(stop_w, b"x")
        process.join()
        conn.close()
        os.close(stop_r)
        os.close(stop_w)
    assert process.exitcode == 0


def test_its_error_is_raised_as_it_said_it():
    process, conn = _started(lambda conn: conn.send(("error", "cannot bind tcp port 80: in use")))
    try:
        with pytest.raises(StartFailed, match="^cannot bind tcp port 80: in use$"):
            wait_ready("the probe", conn, process.pid, LONG)
    finally:
        _stop(process, conn)


@pytest.mark.parametrize("end, how", [(lambda: os._exit(3), "exited with status 3"),
                                      (lambda: os.kill(os.getpid(), signal.SIGKILL), "was killed by SIGKILL")])
def test_a_child_that_ends_before_ready_is_named_with_how_it_ended_at_once(end, how):
    process, conn = _started(lambda conn: end())
    started = time.monotonic()
    try:
        with pytest.raises(StartFailed) as failed:
            wait_ready("the probe", conn, process.pid, LONG)
        assert str(failed.value) == f"the probe (pid {process.pid}) {how} while starting"
        assert time.monotonic() - started < LONG / 2  # its death, not the timeout, ended the wait
    finally:
        _stop(process, conn)
    assert process.exitcode is not None  # left for its owner to reap, which it still can


def test_a_silent_child_times_out_named():
    process, conn = _started(lambda conn: signal.pause())
    try:
        with pytest.raises(StartFailed, match=rf"^the probe \(pid {process.pid}\) did not come up within 0.2 s$"):
            wait_ready("the probe", conn, process.pid, 0.2)
    finally:
        _stop(process, conn)


def test_a_forked_child_is_waited_for_the_same_way():
    """fork_child's children (the sandbox's diverter): a pid and a pipe, no multiprocessing.Process."""
    ready_r, ready_w = multiprocessing.Pipe(duplex=False)
    pid = fork_child(lambda: 4)
    ready_w.close()
    try:
        with pytest.raises(StartFailed, match=r"exited with status 4 while starting"):
            wait_ready("the diverter", ready_r, pid, LONG)
    finally:
        ready_r.close()
        _, status = os.waitpid(pid, 0)  # still ours to reap
    assert os.waitstatus_to_exitcode(status) == 4
