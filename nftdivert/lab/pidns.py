"""The sandbox's process tree: CMD and all it starts, in a PID namespace of its own.

Why a PID namespace and not a cgroup: the namespace's first process is our
init, and every process CMD starts is reparented to it when its parent
goes, daemons that fork twice and call setsid included. So the init reaps
every zombie, and it knows the tree is empty the moment wait() finds no
child left: no polling, no process names. When the init dies, the kernel
kills everything in the namespace; and the init dies with the sandbox
(lifeline.py), so even a SIGKILLed sandbox takes the whole tree along. A
cgroup would need cgroup v2 mounted and delegated to us, and after a
SIGKILL it would live on, with its processes.
"""

from __future__ import annotations

import ctypes
import os
import select
import shlex
import signal
import sys
import time
from pathlib import Path

from nftdivert.process.lifeline import die_with_parent
from nftdivert.process.namespaces import CLONE_NEWNS, CLONE_NEWPID, setns

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_SLAVE = 0x2, 0x4, 0x8, 0x4000, 0x80000
# CMD gets the signal dispositions a shell would give it; Python ignores these.
_DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ)


def _libc(name: str, *args) -> None:
    if getattr(ctypes.CDLL(None, use_errno=True), name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def exit_status(wait_status: int) -> int:
    """A shell's view of a wait status: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Tree:
    """Runs `argv` as the only child of our init, in a new PID namespace."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.cmd_status: int | None = None  # CMD's own status, once it exited
        self.done = False  # the init has exited: nothing of the tree is left
        status_r, status_w = os.pipe()
        life_r, life_w = os.pipe()  # only we hold the write end: the init's lifeline
        own = os.open("/proc/self/ns/pid", os.O_RDONLY)
        # No signal handler of ours may run between unshare and setns.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            _libc("unshare", CLONE_NEWPID)  # our next child is PID 1 of a new namespace
            try:
                pid = os.fork()
                if pid == 0:
                    os.close(status_r)
                    os.close(life_w)
                    _init(argv, env, status_w, life_r, mask)
            finally:
                setns(own, CLONE_NEWPID)  # any later child of ours stays out of it
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(own)
            os.close(status_w)
            os.close(life_r)
        self.pid = pid
        self._status = status_r
        self._lifeline = life_w

    def wait(self, timeout: float) -> bool:
        """True once the tree is empty; returns early when CMD exits (see cmd_status)."""
        while not self.done and select.select([self._status], [], [], timeout)[0]:
            data = os.read(self._status, 64)
            if data:
                self.cmd_status = int(data.split()[-1])
                return False
            self._reap()  # the init closed the pipe: it has exited
        return self.done

    def members(self) -> list[tuple[int, str]]:
        """The processes in the tree but the init: (pid, command line), by pid."""
        try:
            ns = os.readlink(f"/proc/{self.pid}/ns/pid")
        except OSError:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue  # gone meanwhile
            args = cmdline.decode(errors="replace").split("\0")[:-1]
            found.append((int(entry), shlex.join(args)))
        return sorted(found)

    def end(self, grace: float) -> None:
        """SIGTERM to every process in the tree; after `grace` seconds, SIGKILL to all."""
        if self.done:
            return
        os.kill(self.pid, signal.SIGTERM)  # the init passes it on
        deadline = time.monotonic() + grace
        while not self.wait(0.1) and time.monotonic() < deadline:
            pass
        if not self.done:
            os.kill(self.pid, signal.SIGKILL)  # the kernel kills the namespace with it
            self._reap()

    def close(self) -> None:
        """Ends the tree at once if it still runs, and lets go of the pipes."""
        if not self.done:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()
        os.close(self._status)
        os.close(self._lifeline)

    def _reap(self) -> None:
        # Returns only once the kernel has killed and reaped the whole namespace.
        _, status = os.waitpid(self.pid, 0)
        self.done = True
        if self.cmd_status is None:  # CMD did not even start: the init says why
            self.cmd_status = exit_status(status)


def _own_proc() -> None:
    """A /proc that shows the tree's processes only, under the pids they know.

    With the host's, `ps`, `pgrep` and `kill $(pidof x)` inside would mix
    the two pid numberings. Mounted in a mount namespace of the init's own,
    which `ip netns exec` then copies for CMD; nothing reaches the host's.
    """
    _libc("unshare", CLONE_NEWNS)
    _libc("mount", None, b"/", None, MS_REC | MS_SLAVE, None)
    _libc("mount", b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)


def _init(argv: list[str], env: dict[str, str], status_w: int, lifeline: int, mask) -> None:
    """PID 1 of the tree: start CMD, reap everything, report CMD's status; never returns."""
    code = 127
    try:
        die_with_parent(lifeline=lifeline)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sandbox decides what Ctrl-C ends
        # kill(-1) from a namespace's init reaches every other process in it.
        signal.signal(signal.SIGTERM, lambda *_: os.kill(-1, signal.SIGTERM))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            _own_proc()
        except OSError as exc:
            print(f"nftdivert: cannot give the sandbox a /proc of its own: {exc.strerror}", file=sys.stderr,
                  flush=True)
            return
        try:
            cmd = os.posix_spawnp(argv[0], argv, env, setsigdef=_DEFAULT_SIGNALS)
        except OSError as exc:
            print(f"nftdivert: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr, flush=True)
            return
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return  # no process is left in the tree
            if pid == cmd:
                code = exit_status(status)
                os.write(status_w, f"{code}\n".encode())
    finally:
        os._exit(code)
