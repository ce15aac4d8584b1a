"""The capture (-w): what the clients sent and got, as they saw it.

The table's capture chains (templates/ruleset.nft.j2) hand each packet of the
clients' conversations to one nflog group, once, with the addresses and
ports the client used: incoming before conntrack and NAT, replies after
their un-NAT. tcpdump reads the group and writes the pcap (link type NFLOG),
so the per-packet work is done in C, in a process of its own, and never
holds a packet: the kernel copies it to the group's socket and lets it go.
tcpdump writes into a pipe and `cat` copies that to the file: tcpdump
ignores write errors, cat fails on them, and a capture that cannot be
written must stop the run, as the rewritten one does.

tcpdump starts before the ruleset goes in and stops after it is gone, once
it has read what the kernel already handed over. It dies with us (a
SIGTERM, so it still writes out what it holds), and runs in a session of
its own, so a terminal's Ctrl-C reaches it only through us.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

from nftdivert.errors import NftDivertError
from nftdivert.lab.lifeline import die_with_parent

FILE_MODE = 0o640  # captures hold conversation contents: not world-readable
RECEIVE_BUFFER_KIB = 4096  # -B: a burst waits here while tcpdump is busy
START_TIMEOUT = 10.0
DRAIN_TIMEOUT = 2.0
NETLINK_NETFILTER = 12
_COUNTS = re.compile(r"(\d+) packets? (captured|dropped by kernel)")


def open_file(path: str) -> int:
    """The capture file, created or truncated, not inheritable; raises OSError."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)


class NflogCapture:
    """tcpdump on `nflog:GROUP`, its pcap copied by cat to an open file descriptor."""

    def __init__(self, fd: int, group: int, path: str) -> None:
        self.fd, self.group, self.path = fd, group, path
        self.proc: subprocess.Popen | None = None
        self.cat: subprocess.Popen | None = None
        self._err = b""

    def start(self) -> None:
        """Start tcpdump and wait until it reads the group; fail with its own words if it cannot."""
        parent = os.getpid()
        # -Z root: a tcpdump that changed its user would lose the death signal.
        argv = ["tcpdump", "-i", f"nflog:{self.group}", "-w", "-", "-B", str(RECEIVE_BUFFER_KIB), "-Z", "root"]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True,
                                         preexec_fn=lambda: die_with_parent(parent, signum=signal.SIGTERM))
            assert self.proc.stdout is not None
            # cat ends when tcpdump does (end of file), so it needs no death signal of its own.
            self.cat = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=self.fd, stderr=subprocess.PIPE,
                                        start_new_session=True)
        except OSError as exc:
            self.stop()
            raise NftDivertError(f"cannot start the capture {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(self.fd)
            if self.proc is not None and self.proc.stdout is not None:
                self.proc.stdout.close()  # cat's now: tcpdump's writes fail once cat is gone
        deadline = time.monotonic() + START_TIMEOUT
        while b"listening on" not in self._err:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read_err(left):
                self.stop()
                raise NftDivertError(self._why_not())

    def _read_err(self, timeout: float) -> bool:
        assert self.proc is not None and self.proc.stderr is not None
        if not select.select([self.proc.stderr], [], [], timeout)[0]:
            return False
        chunk = os.read(self.proc.stderr.fileno(), 4096)
        self._err += chunk
        return bool(chunk)

    def _why_not(self) -> str:
        said = self._err.decode(errors="replace").strip().splitlines()
        detail = said[-1] if said else "no answer"
        if "Can't listen on group" in detail:
            return (f"nflog group {self.group} is read by another program in this network namespace: "
                    f"set worker.pcap_group to another ({detail})")
        return f"tcpdump cannot capture nflog group {self.group}: {detail}"

    def failed(self) -> str | None:
        """Why the capture stopped while it should run, or None."""
        if self.proc is None or (self.proc.poll() is None and self.cat is not None and self.cat.poll() is None):
            return None
        counts = self.stop()
        return counts.get("error") or f"the capture {self.path} stopped: {self._why_not()}"

    def stop(self) -> dict:
        """Let tcpdump read what the kernel handed over, then stop it.

        Returns its counts, and `error`: why the file is incomplete, or None."""
        proc, cat, self.proc, self.cat = self.proc, self.cat, None, None
        if proc is None:
            return {}
        if proc.poll() is None:
            _drain(self.group, DRAIN_TIMEOUT)
            proc.send_signal(signal.SIGTERM)
            _wait(proc)
        assert proc.stderr is not None
        self._err += proc.stderr.read()
        proc.stderr.close()
        counts = {kind: int(n) for n, kind in _COUNTS.findall(self._err.decode(errors="replace"))}
        error = None
        if cat is not None:
            _wait(cat)  # tcpdump is gone: end of file
            assert cat.stderr is not None
            said = cat.stderr.read().decode(errors="replace").strip()
            cat.stderr.close()
            if cat.returncode != 0:
                error = _cannot_write(self.path, said.rsplit(": ", 1)[-1] or f"cat exited {cat.returncode}")
        return {"captured": counts.get("captured", 0), "dropped": counts.get("dropped by kernel", 0), "error": error}


def _wait(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cannot_write(path: str, reason: str) -> str:
    return f"cannot write the capture {path}: {reason}"


def _drain(group: int, timeout: float) -> None:
    """Until the group's netlink socket holds nothing unread (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _unread(group):
        time.sleep(0.02)


def _unread(group: int) -> int:
    """Bytes waiting in the socket that reads `group`, in this network namespace."""
    try:
        portid = next(int(f[1]) for f in _rows("/proc/net/netfilter/nfnetlink_log") if int(f[0]) == group)
        return next(int(f[4]) for f in _rows("/proc/net/netlink")[1:]
                    if int(f[1]) == NETLINK_NETFILTER and int(f[2]) == portid)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def _rows(path: str) -> list[list[str]]:
    return [line.split() for line in Path(path).read_text().splitlines()]
