"""Which process opened a conversation (local and sandbox mode).

The kernel knows it only while the socket lives: sock_diag finds the socket
by the conversation's tuple (its inode and uid), and /proc/<pid>/fd names
the processes holding that inode. A process that has closed the socket or
exited by then cannot be named; ICMP (ping sockets) is not in sock_diag.

In the sandbox the clients live in another network namespace (and PID
namespace): the sock_diag socket is opened there, and the pid reported is
the one the process sees itself (the last of NSpid).
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Iterator

from nftdivert.netlink import sock_diag
from nftdivert.netlink.codec import NETLINK_SOCK_DIAG as _NETLINK_SOCK_DIAG
from nftdivert.netlink.ipproto import TCP, UDP
from nftdivert.process.namespaces import CLONE_NEWNET, setns


def open_diag_socket(netns_path: str | None) -> socket.socket:
    """A sock_diag socket in the namespace at `netns_path` (None: ours).

    A socket belongs to the namespace it was made in: a thread of its own
    enters the other one, makes it, and ends, so no thread of ours moves.
    """
    if netns_path is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    made: list = []

    def enter_and_make() -> None:
        try:
            setns(netns_path, CLONE_NEWNET)
            made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG))
        except OSError as exc:
            made.append(exc)

    # The thread ends inside the other namespace; the kernel frees it with the thread.
    thread = threading.Thread(target=enter_and_make, name="nftdivert-netns")
    thread.start()
    thread.join()
    if isinstance(made[0], OSError):
        raise made[0]
    return made[0]


def _net_of(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _holders(net: str) -> Iterator[tuple[str, int]]:
    """(pid, socket inode) for every socket of every process in network namespace `net`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or _net_of(pid) != net:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                yield pid, int(target[8:-1])


def describe(pid: str, uid: int) -> dict | None:
    """pid (as the process sees it), host_pid, command line and uid of one process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [pid])
    except OSError:
        return None
    command = " ".join(a.decode("utf-8", "replace") for a in argv)
    return {"pid": int(nspid[-1]), "host_pid": int(pid), "command": command, "uid": uid}


class ProcessOwners:
    """Conversation tuple -> the process that holds its socket, in one network namespace."""

    def __init__(self, netns_path: str | None = None) -> None:
        self._sock = open_diag_socket(netns_path)
        self._sock.settimeout(1.0)
        self._net = f"net:[{os.stat(netns_path).st_ino}]" if netns_path else os.readlink("/proc/self/ns/net")

    def close(self) -> None:
        self._sock.close()

    def find(self, protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> dict | None:
        if protocol not in (TCP, UDP):
            return None
        try:
            found = sock_diag.owner(self._sock, protocol, src, sport, dst, dport)
        except OSError:
            return None
        if found is None:
            return None
        uid, inode = found
        for pid, held in _holders(self._net):
            if held == inode:
                return describe(pid, uid)
        return None
