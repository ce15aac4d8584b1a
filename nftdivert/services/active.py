"""Active FTP's data connection: from the address the client asked for, port 20, to where it listens.

A client that sends PORT expects the data connection from the server it
talked to. This host does not own that address, so the socket is
transparent (IP_TRANSPARENT lets it bind any address and send from it).
The client's answers, sent to that address, would be routed onward (or
nowhere): a routing rule makes TCP to port 20 local, so they reach the
socket. NAT leaves them alone (they answer our connection, the diverter's
rules only turn new ones), and the conntrack entry is the host's own.
Only port 20's answers are affected, nothing new arrives there (diverted
conversations have their destination rewritten before routing). The rule
is added on the first active transfer and removed when the listeners stop
(`unroute`). The process that adds it holds a lock file for it (per network
namespace and family) as long as it lives: after a SIGKILL the file is there with
nobody holding it, and the next `run` or `remove` takes the stale rule away
(`remove_stale`), never one a live run's transfer needs.
If the transparent connection fails, the data connection comes from the
host's own address, which every client library we know accepts too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

from nftdivert.process import lockfile
from nftdivert.services.tls import Plain

DATA_PORT = 20
CONNECT_TIMEOUT = 5.0
TABLE = "2020"  # the routing table holding "everything is local"
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75

LOCK_DIR = Path("/run/nftdivert")
# "-4", "-6": the rules this process added -> the lock it holds for each while they exist
_routed: dict[str, int] = {}


def _ip(*args: str) -> bool:
    try:
        return subprocess.run(["ip", *args], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _lock_path(family: str) -> Path:
    return LOCK_DIR / f"active-ftp{family}-{os.stat('/proc/self/ns/net').st_ino}.lock"


def _route(family: str) -> None:
    if family in _routed:
        return
    try:
        LOCK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock = lockfile.acquire(_lock_path(family), 0o644)
    except OSError:
        lock = None
    if lock is None:
        return  # a live sibling listener process made this family's rule: it serves us too
    _ip(family, "route", "replace", "local", "default", "dev", "lo", "table", TABLE)
    if _ip(family, "rule", "add", "priority", TABLE, "ipproto", "tcp", "dport", str(DATA_PORT), "lookup", TABLE):
        _routed[family] = lock
    else:
        lockfile.release(_lock_path(family), lock)


def _delete(family: str) -> None:
    for _ in range(8):  # one, unless an older version's processes added it twice
        if not _ip(family, "rule", "del", "priority", TABLE, "ipproto", "tcp", "dport", str(DATA_PORT),
                   "lookup", TABLE):
            break
    _ip(family, "route", "flush", "table", TABLE)


def unroute() -> None:
    """Remove what `_route` added (nothing if no active transfer happened)."""
    for family, lock in _routed.items():
        _delete(family)
        lockfile.release(_lock_path(family), lock)
    _routed.clear()


def remove_stale() -> bool:
    """The rules a killed process left in this network namespace: removed; True if there were.
    A live holder's (another run's transfer) are left alone."""
    found = False
    for family in ("-4", "-6"):
        path = _lock_path(family)
        try:
            fd = lockfile.acquire(path, create=False)
        except OSError:
            continue
        if fd is None:
            continue  # none made, or its maker lives
        try:
            _delete(family)
            found = True
        finally:
            lockfile.release(path, fd)
    return found


async def _open(source: tuple[str, int] | None, target: tuple[str, int], family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind(source)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), CONNECT_TIMEOUT)
        return sock
    except BaseException:
        sock.close()
        raise


async def connect(asked: str, target: tuple[str, int]):
    """(stream, its end) to the client's `target`, from `asked` port 20 if possible; None if none."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(target[0]).version == 6 else socket.AF_INET
        source_family = socket.AF_INET6 if ":" in asked else socket.AF_INET
    except ValueError:
        return None
    sock = None
    if family == source_family:
        _route("-6" if family == socket.AF_INET6 else "-4")
        try:
            sock = await _open((asked, DATA_PORT), target, family)
        except (OSError, asyncio.TimeoutError):
            sock = None
    if sock is None:
        try:
            sock = await _open(None, target, family)
        except (OSError, asyncio.TimeoutError):
            return None
    reader, writer = await asyncio.open_connection(sock=sock)

    async def end() -> None:
        writer.close()

    return Plain(reader, writer), end
