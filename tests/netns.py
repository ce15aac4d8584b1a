"""Network namespaces as test hosts: unique names, always removed.

Every test host is a namespace named `<prefix>-<pid>-<n>`; removal kills
whatever still runs inside it first, so nothing outlives a failed test.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

_counter = itertools.count()
PREFIX = "ndt"


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check)


@dataclass
class Netns:
    name: str
    _procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        if argv[:1] == ("ip",):  # the same as `ip netns exec NAME ip ...`, one process less
            return ["ip", "-n", self.name, *argv[1:]]
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60, input: str | bytes | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        proc = subprocess.run(self.argv(*argv), capture_output=True, text=text, timeout=timeout,
                              input=input, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(self.argv(*argv), **kw)
        self._procs.append(proc)
        return proc

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream:
                    stream.close()
        _ip("netns", "del", self.name, check=False)


def create(role: str) -> Netns:
    name = f"{PREFIX}-{role}-{os.getpid()}-{next(_counter)}"
    _ip("netns", "add", name)
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


def link(a: Netns, a_if: str, a_addrs: list[str], b: Netns, b_if: str, b_addrs: list[str]) -> None:
    """A veth pair between two namespaces, addressed and up (IPv6 DAD off)."""
    tmp_a, tmp_b = f"v{os.getpid() % 10000}a{next(_counter)}", f"v{os.getpid() % 10000}b{next(_counter)}"
    _ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    _ip("link", "set", tmp_a, "netns", a.name)
    _ip("link", "set", tmp_b, "netns", b.name)
    for ns, tmp, ifname, addrs in ((a, tmp_a, a_if, a_addrs), (b, tmp_b, b_if, b_addrs)):
        ns.run("ip", "link", "set", tmp, "name", ifname)
        ns.run("sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0")
        for addr in addrs:
            ns.run("ip", "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else []))
        ns.run("ip", "link", "set", ifname, "up")


def leftovers() -> list[str]:
    """Namespaces of this test run that still exist."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.startswith(f"{PREFIX}-") and f"-{os.getpid()}-" in line]
