"""The DNS pool for listener processes other than its owner.

The DNS listeners and their Resolver (the name pools, every profile's
too, the fixed records, one_address) live in the first listener process
only: a name has one address per pool for the whole run. A DoH question
carries its client, so the owner answers it from the client's profile's
pool; naming an address needs no client (it names one name, whichever pool). The others still need it: DNS over HTTPS
answers from it, [[custom]] rules by `names` and a proxy's `target_name`
name an address by it. Each other process gets a Remote in its place, which
asks the owner over a socketpair of its own (made before the fork); the
owner answers on its listeners' loop. A question waits at most
`TIMEOUT`; without an answer (the owner slow or gone) it is answered as
if there were no pool, and counted.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time

TIMEOUT = 2.0  # seconds a question waits for the owner
_MESSAGE = 1 << 17  # a DoH query or its answer fits (DNS messages are at most 64 KiB)
_METHODS = ("answer", "name_for")  # what a resolver is asked outside dns.py


def pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """(owner's end, asker's end) for processes 1..count-1 (index 0: None), made before they fork."""
    return [None] + [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(1, count)]


def ends_for(me: int, made) -> list[socket.socket]:
    """In process `me` after the fork: the owner keeps every owner's end, another its asker's end;
    the rest closed (so an owner's death is a closed socket, not a silence)."""
    kept = []
    for i, pair in enumerate(made):
        if pair is None:
            continue
        owners_end, askers_end = pair
        keep = owners_end if me == 0 else askers_end if i == me else None
        for end in pair:
            if end is keep:
                kept.append(end)
            else:
                end.close()
    return kept


class Remote:
    """In place of the Resolver in a process that does not own the pool: the same calls, asked of the owner."""

    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self._sock, self._timeout = sock, timeout
        self._lock = threading.Lock()
        self._sequence = 0
        self.unanswered = 0  # questions the owner did not answer in time (or could not: gone)

    def answer(self, wire: bytes, client: str = "", local: str = "") -> bytes | None:
        return self._ask("answer", wire, client, local)

    def name_for(self, address) -> str | None:
        return self._ask("name_for", address)

    def set_answers(self, profiles) -> None:
        """A reload's answers: the owner applies its own."""

    def _ask(self, method: str, *args):
        with self._lock:
            self._sequence += 1
            asked = self._sequence
            deadline = time.monotonic() + self._timeout
            try:
                self._sock.settimeout(self._timeout)
                self._sock.send(pickle.dumps((asked, method, args)))
                while True:  # an answer that came too late to an earlier question is passed over
                    self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    data = self._sock.recv(_MESSAGE)
                    if not data:
                        raise OSError("the pool's owner is gone")
                    number, result = pickle.loads(data)
                    if number == asked:
                        return result
            except (OSError, pickle.UnpicklingError, ValueError):  # socket.timeout is an OSError
                self.unanswered += 1
                return None

    def close(self) -> None:
        self._sock.close()


class Owner:
    """The owner's side: each asker's questions answered by `resolver` on `loop` (the DNS listeners')."""

    def __init__(self, loop, resolver, socks: list[socket.socket]) -> None:
        self._loop, self._resolver, self._socks = loop, resolver, socks
        for sock in socks:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._read, sock)

    def _read(self, sock: socket.socket) -> None:
        for _ in range(64):  # a turn, so one busy asker cannot hold the loop
            try:
                data = sock.recv(_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # that process is gone: nothing more to read
                self._loop.remove_reader(sock.fileno())
                return
            try:
                number, method, args = pickle.loads(data)
                result = getattr(self._resolver, method)(*args) if method in _METHODS else None
                sock.send(pickle.dumps((number, result)))
            except (OSError, pickle.UnpicklingError, ValueError, TypeError):
                continue  # the asker counts it as unanswered

    def close(self) -> None:
        for sock in self._socks:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
                sock.close()
