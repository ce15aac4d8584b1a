"""FTP data connections between listener processes.

With several listener processes the kernel spreads connections by their
addresses and ports, so a passive data connection may reach another process
than the session that named its port. Each process has an inbox (a unix
SEQPACKET socket) every other process may write to. A session announces the
(client, port) it expects to every sibling before its 227 leaves, so the
announcement is in a sibling's inbox before the client can connect; a
sibling that accepts that connection reads its inbox first, then sends the
socket itself (SCM_RIGHTS) with any bytes already read to the owner, which
hands it to the session (ftp.claim). Announcements are withdrawn when the
session claims or gives up, and expire in any case.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import time
from typing import Awaitable, Callable

_EXPIRES = 30.0  # seconds an announcement is believed without its withdrawal (ftp.DATA_TIMEOUT is 10)
_MESSAGE = 1 << 16

Handed = Callable[[socket.socket, str, bytes], Awaitable[None]]  # the socket, its listener's name, bytes read


class Handoff:
    """Process `me`'s side: its inbox, and the way into every sibling's."""

    def __init__(self, me: int, inbox: socket.socket, outboxes: dict[int, socket.socket]) -> None:
        self.me, self._inbox, self._outboxes = me, inbox, outboxes
        self._inbox.setblocking(False)
        self._owners: dict[tuple[str, int], tuple[int, float]] = {}  # (client, port) -> (sibling, expiry)
        self.on_handed: Handed | None = None
        self._tasks: set[asyncio.Task] = set()

    def fileno(self) -> int:
        return self._inbox.fileno()

    def _tell_all(self, message: tuple) -> None:
        data = pickle.dumps(message)
        for box in self._outboxes.values():
            try:
                box.send(data)
            except OSError:
                pass  # that sibling is gone: the run stops anyway

    def announce(self, client: str, port: int) -> None:
        self._tell_all(("expect", client, port, self.me))

    def withdraw(self, client: str, port: int) -> None:
        self._tell_all(("withdraw", client, port, self.me))

    def read(self) -> None:
        """Everything in the inbox: announcements applied, handed sockets served (the loop calls it when readable)."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._inbox, _MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            message = pickle.loads(data)
            if message[0] == "expect":
                self._owners[message[1], message[2]] = (message[3], time.monotonic() + _EXPIRES)
            elif message[0] == "withdraw":
                if self._owners.get((message[1], message[2]), (None,))[0] == message[3]:
                    del self._owners[message[1], message[2]]
            elif message[0] == "socket" and fds:
                sock = socket.socket(fileno=fds[0])
                if self.on_handed is None:
                    sock.close()
                    continue
                task = asyncio.get_running_loop().create_task(self.on_handed(sock, message[1], message[2]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            for fd in fds[1:]:
                socket.close(fd)

    def expecting(self) -> bool:
        """A sibling's session waits for some data connection (the inbox is read first)."""
        self.read()
        now = time.monotonic()
        for key in [k for k, (_, until) in self._owners.items() if until < now]:
            del self._owners[key]
        return bool(self._owners)

    def owner(self, client: str, port: int) -> int | None:
        found = self._owners.get((client, port))
        return found[0] if found is not None else None

    def hand_over(self, client: str, port: int, sock: socket.socket, listener: str, read: bytes) -> bool:
        """Send `sock` to the sibling expecting it; the caller closes its own copy."""
        owner = self._owners.pop((client, port), (None,))[0]
        box = self._outboxes.get(owner) if owner is not None else None
        if box is None:
            return False
        try:
            socket.send_fds(box, [pickle.dumps(("socket", listener, read))], [sock.fileno()])
        except OSError:
            return False
        return True

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._inbox.close()
        for box in self._outboxes.values():
            box.close()


current: Handoff | None = None  # this process's, when there are siblings


def pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """(inbox, its writing end) for each of `count` processes, made before they fork."""
    return [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(count)]


def for_process(me: int, made: list[tuple[socket.socket, socket.socket]]) -> Handoff:
    """In process `me` after the fork: its inbox and its siblings' writing ends; the rest closed."""
    outboxes = {}
    for i, (inbox, writer) in enumerate(made):
        if i == me:
            writer.close()
        else:
            inbox.close()
            outboxes[i] = writer
    return Handoff(me, made[me][0], outboxes)
