"""Network namespaces as test hosts: nftdivert.lab.netns, failing as assertions.

Every test host is a namespace named `<prefix>-<role>-<pid>-<n>`; removal
kills whatever still runs inside it first, so nothing outlives a failed test.
"""

from __future__ import annotations

import os
import subprocess

from nftdivert.lab import netns as _netns

PREFIX = "ndt"


class Netns(_netns.Netns):
    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        try:
            return super().run(*argv, **kw)
        except _netns.CommandFailed as exc:
            raise AssertionError(str(exc)) from None

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return super().popen(*argv, **kw)


def create(role: str) -> Netns:
    return Netns.create(f"{PREFIX}-{role}")


def link(a: Netns, a_if: str, a_addrs: list[str], b: Netns, b_if: str, b_addrs: list[str]) -> None:
    """A veth pair between two namespaces, addressed and up (IPv6 DAD off)."""
    _netns.veth(a, a_if, a_addrs, b, b_if, b_addrs)


def leftovers() -> list[str]:
    """Namespaces of this test run that still exist."""
    return [name for name, pid in _netns.owners(PREFIX).items() if pid == os.getpid()]


def remove_stale() -> list[str]:
    """Namespaces of an earlier test run that was killed: removed now. SIGTERM
    first, so an `nftdivert run` inside removes its stats file under /run."""
    return _netns.remove_stale(PREFIX, grace=5.0)
