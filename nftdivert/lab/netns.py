"""Network namespaces: unique names, veth links, commands inside, always removed.

The one namespace toolkit for the sandbox, the test hosts and the benchmark.
A namespace is named `<prefix>-<pid>-<n>` after the process that made it, so
a later run can tell a stale one (its maker was SIGKILLed) from one still in
use. Processes inside are found and signalled by pid, never by name. Pure
Python plus `ip`.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from nftdivert.errors import NftDivertError
from nftdivert.process.namespaces import CLONE_NEWNET, setns

NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # `ip netns exec` mounts files from here over /etc
_counter = itertools.count()


class CommandFailed(NftDivertError):
    """A command for or inside a namespace exited non-zero."""


def _ip(*argv: str) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CommandFailed(f"ip {' '.join(argv)}: {proc.stderr.strip()}")


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def _net_of(path: str | Path) -> tuple[int, int] | None:
    """Which network namespace a /run/netns entry or /proc/PID/ns/net is."""
    try:
        st = os.stat(path)
    except OSError:  # gone, or a zombie (it has no namespace any more)
        return None
    return st.st_dev, st.st_ino


@dataclass
class Netns:
    name: str
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, prefix: str) -> Netns:
        """A new namespace named `<prefix>-<pid>-<n>`, loopback up."""
        return cls.add(unique_name(prefix))

    @classmethod
    def add(cls, name: str) -> Netns:
        """A new namespace called `name`, loopback up."""
        ns = cls(name)
        _ip("netns", "add", ns.name)
        try:
            ns.run("ip", "link", "set", "lo", "up")
        except BaseException:
            ns.delete()
            raise
        return ns

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | bytes | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        proc = subprocess.run(self.argv(*argv), capture_output=True, text=text, timeout=timeout,
                              input=input, env=env)
        if check and proc.returncode != 0:
            raise CommandFailed(f"{self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                                f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        """Start a command inside; delete() stops it, even before it has entered the namespace."""
        proc = subprocess.Popen(self.argv(*argv), **kw)
        self._procs.append(proc)
        return proc

    def enter(self) -> None:
        """Move the calling thread into this namespace (meant for a forked child)."""
        setns(NETNS_DIR / self.name, CLONE_NEWNET)

    def pids(self) -> list[int]:
        """The processes inside, as `ip netns pids` finds them."""
        net = _net_of(NETNS_DIR / self.name)
        if net is None:
            return []
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _net_of(f"/proc/{p}/ns/net") == net]

    def kill(self, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process inside; returns their pids.

        A pidfd pins each process before its namespace is checked again, so a
        pid that was reused meanwhile by a process elsewhere is never hit.
        """
        net = _net_of(NETNS_DIR / self.name)
        hit = []
        for pid in self.pids():
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if _net_of(f"/proc/{pid}/ns/net") == net:
                    signal.pidfd_send_signal(fd, sig)
                    hit.append(pid)
            except OSError:
                pass
            finally:
                os.close(fd)
        return hit

    def _signal_all(self, sig: int) -> bool:
        mine = [proc for proc in self._procs if proc.poll() is None]
        for proc in mine:
            proc.send_signal(sig)
        return bool(self.kill(sig) or mine)

    def delete(self, grace: float = 0.0) -> None:
        """Stop everything inside, then remove the namespace; never raises.

        With `grace`, SIGTERM first and up to that many seconds to exit (a
        process may have traces outside to remove), then SIGKILL for the rest.
        """
        try:
            if grace > 0 and self._signal_all(signal.SIGTERM):
                deadline = time.monotonic() + grace
                while (self.pids() or any(p.poll() is None for p in self._procs)) and time.monotonic() < deadline:
                    time.sleep(0.05)
            deadline = time.monotonic() + 5
            while self._signal_all(signal.SIGKILL) and time.monotonic() < deadline:
                time.sleep(0.02)  # until they are gone, not merely signalled
            for proc in self._procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                for stream in (proc.stdout, proc.stderr, proc.stdin):
                    if stream:
                        stream.close()
        finally:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            shutil.rmtree(ETC_NETNS / self.name, ignore_errors=True)

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()


def veth(a: Netns, a_if: str, a_addrs: list[str], b: Netns, b_if: str, b_addrs: list[str]) -> None:
    """A veth pair between two namespaces, addressed and up.

    Both ends are made inside their namespaces, so no interface name in the
    host's namespace can clash. IPv6 skips duplicate address detection, so
    addresses work at once.
    """
    _ip("link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
        if any(":" in addr for addr in addrs):
            # The link-local address too; /proc/sys/net is the opener's namespace, so write it from inside.
            ns.run("sh", "-c", 'echo 0 > "$1"', "-", f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad")
        for addr in addrs:
            ns.run("ip", "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else []))
        ns.run("ip", "link", "set", ifname, "up")


def owners(prefix: str) -> dict[str, int]:
    """The namespaces named `<prefix>-[...-]<pid>-<n>`, each with the pid that made it."""
    pattern = re.compile(rf"{re.escape(prefix)}-(?:.*-)?(\d+)-\d+")
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return {}
    return {name: int(m.group(1)) for name in names if (m := pattern.fullmatch(name))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale(prefix: str, grace: float = 0.0) -> list[str]:
    """Remove the namespaces of `prefix` whose maker is gone; returns those removed."""
    removed = []
    for name, pid in owners(prefix).items():
        if not _alive(pid):
            ns = Netns(name)
            ns.delete(grace)
            if not ns.exists():
                removed.append(name)
    return removed
