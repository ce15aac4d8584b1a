"""Lock files: one holder at a time, free again when it dies (even by SIGKILL) or removes it."""

from __future__ import annotations

import os
import signal

from nftdivert.process import lockfile


def _holding(path) -> int:
    """A child that holds `path`'s lock until killed; its pid, once it holds it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            lockfile.acquire(path)
            os.write(w, b"x")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


def test_a_held_lock_is_refused_and_names_its_holder(tmp_path):
    path = tmp_path / "a.lock"
    fd = lockfile.acquire(path)
    try:
        os.write(fd, b"42")
        pid = os.fork()
        if pid == 0:  # another process: flock is per open file, so ask from one
            taken = lockfile.acquire(path) is None
            probe = lockfile.holder(path)
            os._exit(0 if taken and probe is not None and os.pread(probe, 8, 0) == b"42" else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        lockfile.release(path, fd)
    assert not path.exists()
    assert lockfile.holder(path) is None


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    path = tmp_path / "a.lock"
    pid = _holding(path)
    assert lockfile.acquire(path, create=False) is None
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert lockfile.holder(path) is None  # the file is left, its lock is not
    fd = lockfile.acquire(path, create=False)
    assert fd is not None
    lockfile.release(path, fd)


def test_a_missing_file_is_not_made_when_only_a_stale_one_is_wanted(tmp_path):
    assert lockfile.acquire(tmp_path / "none.lock", create=False) is None
    assert not (tmp_path / "none.lock").exists()
