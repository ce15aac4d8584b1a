"""Conntrack accounting and timestamps on for the run, and back as they were after it.

Both are per network namespace and apply to entries created from then on:
nf_conntrack_acct gives the end record its packet and byte counters,
nf_conntrack_timestamp its start and stop times.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SYSCTLS = (Path("/proc/sys/net/netfilter/nf_conntrack_acct"), Path("/proc/sys/net/netfilter/nf_conntrack_timestamp"))


@contextmanager
def accounting(paths: tuple[Path, ...] = SYSCTLS) -> Iterator[dict[Path, str]]:
    """Set each to 1; yields what they were; restores them on the way out, whatever happened."""
    before: dict[Path, str] = {}
    try:
        for path in paths:
            try:
                before[path] = path.read_text().strip()
            except FileNotFoundError:
                continue  # a kernel without it: records go without counters or stamps
            if before[path] != "1":
                path.write_text("1\n")
        yield before
    finally:
        for path, value in before.items():
            if value != "1":
                try:
                    path.write_text(value + "\n")
                except OSError:
                    pass  # the namespace may be going away with us
