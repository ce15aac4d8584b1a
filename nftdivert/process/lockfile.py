"""Lock files that say whether their holder lives: an flock, which the kernel drops
when the last process holding it dies, SIGKILL included.

A holder removes its file as it ends: it unlinks it while still holding the
lock, then lets go. Whoever opened the old file meanwhile finds, once it has
the lock, that the path names another file (or none) and opens that instead.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def acquire(path: Path, mode: int = 0o600, *, create: bool = True) -> int | None:
    """Hold the lock of `path`: its fd, or None while a live process holds it (or, with
    `create` False, when there is no such file). Forked children share the hold; a program
    they run does not get the fd. Raises OSError when the file cannot be opened."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(path, flags, mode)
        except FileNotFoundError:
            if create:
                raise
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _still_at(fd, path):
            return fd
        os.close(fd)  # its holder removed it as it ended: the lock is the file there now, if any


def release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then let go; never raises."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    os.close(fd)


def holder(path: Path) -> int | None:
    """A read-only fd of `path` while a live process holds its lock (to read what it wrote
    there), else None. The probe's shared lock lasts only this call."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None  # never made, or removed by its last holder
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return fd
    os.close(fd)  # a file left by a killed holder: the kernel let go of its lock
    return None


def _still_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
