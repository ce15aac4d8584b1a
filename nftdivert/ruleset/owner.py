"""Who owns a table: at most one live `nftdivert run` per network namespace and table.

A run holds an flock on STATE_DIR/<table>-<netns inode>.lock for its whole
life and writes its pid and the digest of its ruleset there. The kernel drops
the lock when the process dies, kill -9 included, so a table whose owner is
dead is stale and free to replace. `apply` has no long-lived owner: it may
load a live run's table only with the very ruleset that run loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nftdivert.errors import NftDivertError, TableTaken
from nftdivert.process import lockfile

STATE_DIR = Path("/run/nftdivert")
# Probes (`status`, `apply`) hold the lock shared for an instant; a claim
# that meets one tries again for this long before it calls the table taken.
_CLAIM_SECONDS = 0.5


def netns_id() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def lock_path(table: str) -> Path:
    return STATE_DIR / f"{table}-{netns_id()}.lock"


def digest(ruleset: str) -> str:
    return hashlib.sha256(ruleset.encode()).hexdigest()


@dataclass(frozen=True)
class Owner:
    pid: int | None  # None: the owner has not written it yet
    ruleset: str = ""  # digest of the ruleset it loaded; "" until it did


class Claim:
    """This process owns the table until release() (or until it dies)."""

    def __init__(self, table: str, path: Path, fd: int) -> None:
        self.table, self.path, self._fd = table, path, fd
        _claims.add(self)
        self._write("")

    def record(self, ruleset: str) -> None:
        """Note the ruleset this run loads: `apply` may load that one again, no other."""
        self._write(digest(ruleset))

    def _write(self, ruleset_digest: str) -> None:
        data = json.dumps({"pid": os.getpid(), "ruleset": ruleset_digest}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Unlink while still locked, then unlock: whoever opened the old file tries again."""
        if self._fd >= 0:
            lockfile.release(self.path, self._forget())

    def _close(self) -> None:
        fd = self._forget()
        if fd >= 0:
            os.close(fd)

    def _forget(self) -> int:
        fd, self._fd = self._fd, -1
        _claims.discard(self)
        return fd


_claims: set[Claim] = set()


def _forget_in_child() -> None:
    # A forked child (the listener process) shares the lock's open file
    # description; if it kept it, the lock would outlive this process.
    for c in list(_claims):
        c._close()


os.register_at_fork(after_in_child=_forget_in_child)


def claim(table: str) -> Claim:
    """Own `table` in this network namespace, or raise TableTaken naming the owner."""
    path = lock_path(table)
    try:
        STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise NftDivertError(f"cannot make {STATE_DIR}, where a run records that it owns its table: "
                             f"{exc.strerror or exc}") from None
    deadline = time.monotonic() + _CLAIM_SECONDS
    while True:
        try:
            fd = lockfile.acquire(path, 0o644)
        except OSError as exc:
            raise NftDivertError(f"cannot open {path}: {exc.strerror or exc}") from None
        if fd is not None:
            return Claim(table, path, fd)
        if time.monotonic() > deadline:
            raise TableTaken(taken_message(table, owner_of(table)))
        time.sleep(0.02)


def owner_of(table: str) -> Owner | None:
    """The live nftdivert run that owns `table` in this network namespace, if any."""
    fd = lockfile.holder(lock_path(table))
    if fd is None:
        return None  # nobody claimed it, the last owner released it, or a killed owner left it
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> Owner:
    try:
        data = json.loads(os.pread(fd, 4096, 0))
        return Owner(int(data["pid"]), str(data.get("ruleset", "")))
    except (ValueError, KeyError, TypeError):
        return Owner(None)  # being written this very moment


def taken_message(table: str, owner: Owner | None) -> str:
    who = f"nftdivert run (pid {owner.pid})" if owner and owner.pid else "another nftdivert run"
    return (f"table inet {table} is owned by {who} in this network namespace: stop that run first, "
            "or give this one another table (table = ...) and other queue numbers")


def check_apply(table: str, ruleset: str) -> None:
    """`apply` may reload a live run's table with the same ruleset (to undo drift), not another one."""
    owner = owner_of(table)
    if owner is not None and owner.ruleset != digest(ruleset):
        who = f"nftdivert run (pid {owner.pid})" if owner.pid else "a running nftdivert"
        raise TableTaken(f"table inet {table} is owned by {who} in this network namespace, which loaded "
                         "another ruleset: stop it first (apply may only load the same ruleset again)")
