"""Entering a namespace by its file (/run/netns/NAME, /proc/PID/ns/...), with setns(2).

Python's os module has setns only from 3.12 on; libc's is the same call on any version.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


def setns(target: str | Path | int, nstype: int) -> None:
    """Move the calling thread into the namespace `target` names (a path, or an open fd of one).

    Only this thread moves; for a PID namespace, only the children forked afterwards.
    Raises OSError naming the namespace.
    """
    fd = target if isinstance(target, int) else os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, nstype) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {target}: {os.strerror(errno)}")
    finally:
        if fd is not target:
            os.close(fd)
