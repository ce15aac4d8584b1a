"""Which address and port a client originally asked for, as the listener process asks it.

The listener sees only its own tuple: the redirect changed the address and
the queue worker the port. The worker's conversation table knows the route
(listener-side tuple -> original port), conntrack the original address. So
the listener process asks its parent over a pipe of its own, one short
request at a time, and takes no answer within ORIGIN_TIMEOUT as unknown.

The parent answers in the worker's loop, between turns of packets: it reads
the table without reordering it and asks conntrack on a socket of its own.
The kernel path asks nobody for TCP: the accepted socket's own conntrack
entry names the original destination (of_socket). The UDP listener has no
socket per conversation, so it asks on both paths, naming the protocol.

The parent's answer also names the client port the client used: the
listener may have seen another (the worker's alias, or the kernel's at input
NAT), and its records name the conversation's client as its start does
(client_fields). of_socket cannot tell; the log can (observers/logorder.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from functools import partial
from typing import Callable, NamedTuple, Protocol

from nftdivert.netlink.ipproto import TCP

ORIGIN_TIMEOUT = 0.5  # seconds a listener waits for its parent's answer
# getsockopt names (linux/netfilter_ipv4.h, netfilter_ipv6/ip6_tables.h): the
# original destination of an accepted connection, from its conntrack entry.
SO_ORIGINAL_DST = 80  # at IPPROTO_IP; IP6T_SO_ORIGINAL_DST is the same number at IPPROTO_IPV6

Endpoint = tuple[str, int]  # (address as text, port)


class Asked(NamedTuple):
    """What the client asked for, and the client port it used (None: not known here)."""

    address: str
    port: int
    client_port: int | None = None
Entry = Callable[[int, int, bytes, int, bytes, int], object]  # conntrack.Conntrack.entry


class Table(Protocol):
    def peek(self, binding: tuple): ...

    def recent_ports(self, protocol: int, client: bytes, local: bytes, limit: int) -> list[int]: ...


# How many of a client's original ports a question the table cannot place may try (as the worker's).
REMAP_TRIES = 16


def _packed(host: str) -> bytes:
    return ipaddress.ip_address(host.removeprefix("::ffff:")).packed  # IPv4 on the dual-stack socket


def original(table: Table | None, entry: Entry | None, client: Endpoint, local: Endpoint,
             protocol: int = TCP) -> Asked | None:
    """The destination `client` asked for, that reached the listener at `local`, and the
    client port it used.

    Diverted: the table holds the conversation under the listener's tuple;
    its original port is the route's, its address conntrack's (or the local
    one when conntrack does not say), the client's port the route's. Not in
    the table: a bound port the worker never rewrote; conntrack's reply tuple
    is the listener's own (the redirect changed only the address), its
    original tuple names the client's port; without an entry the local
    address and port are what the client asked for.
    """
    try:
        client_b, local_b = _packed(client[0]), _packed(local[0])
    except ValueError:
        return None
    version = 4 if len(client_b) == 4 else 6
    conv = table.peek((protocol, client_b, client[1], local_b)) if table is not None else None
    if conv is not None:
        route = conv.route
        if conv.original is not None:
            return _text(conv.original, route[2])
        found = _ask(entry, version, protocol, client_b, conv.reply_port, local_b, route[4])
        return _text((found.dst, found.dst_port) if found is not None else (local_b, route[4]), route[2])
    found = _ask(entry, version, protocol, client_b, client[1], local_b, local[1])
    if found is None and table is not None:
        found = _remapped(table, entry, version, protocol, client_b, client[1], local_b)
    if found is None:
        return _text((local_b, local[1]), client[1])
    return _text((found.dst, found.dst_port), found.src_port)


def _remapped(table: Table, entry: Entry | None, version: int, protocol: int, client: bytes, port: int,
              local: bytes):
    """The entry of a diverted datagram the kernel gave another client port at input NAT
    (the same client port towards another address): the worker wrote the route's port,
    the kernel then its own, and the worker learns of it only at the listener's reply.
    Conntrack's reply tuple is local:P -> client:port, for one of the client's original ports P."""
    for original_port in table.recent_ports(protocol, client, local, REMAP_TRIES):
        found = _ask(entry, version, protocol, client, port, local, original_port)
        if found is not None:
            return found
    return None


def of_socket(sock) -> Asked | None:
    """The kernel path's answer, from the accepted socket itself: no round trip.

    Conntrack finds the entry by the socket's own tuple, which on the kernel
    path is the entry's reply tuple (the redirect gave the listener's port).
    On the queue path the worker rewrote the port after conntrack, so only
    the parent's table knows the route: ask it instead.
    """
    try:
        peer = sock.getpeername()[0]
        if sock.family == socket.AF_INET6 and not peer.startswith("::ffff:"):
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
            return Asked(str(ipaddress.IPv6Address(raw[8:24])), int.from_bytes(raw[2:4], "big"))
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in (v4-mapped clients too)
        return Asked(str(ipaddress.IPv4Address(raw[4:8])), int.from_bytes(raw[2:4], "big"))
    except (OSError, ValueError):  # no entry (conntrack not loaded, or gone already)
        return None


def _ask(entry: Entry | None, *args):
    if entry is None:
        return None
    try:
        return entry(*args)
    except OSError:  # ConntrackError included: answer from what the table knows
        return None


def _text(addr: tuple[bytes, int], client_port: int) -> Asked:
    return Asked(str(ipaddress.ip_address(addr[0])), addr[1], client_port)


def endpoint(addr) -> str:
    """"192.0.2.2:40000", "[2001:db8::2]:40000": an address and port as the log writes them."""
    host = addr[0].removeprefix("::ffff:")  # IPv4 on the dual-stack socket
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def client_port(peer, asked: tuple | None) -> int:
    """The port the client used: the one its parent's answer names (Asked), else the one the listener saw."""
    return asked[2] if asked is not None and len(asked) > 2 and asked[2] is not None else peer[1]


def client_fields(peer, asked: tuple | None) -> dict:
    """A listener record's `client` and `client_address`: its conversation's client, as the
    start names it. `peer` is the client as the listener saw it; where that is not the port
    the client used, `listener_client_port` says what it saw."""
    address, port = peer[0].removeprefix("::ffff:"), client_port(peer, asked)
    fields = {"client": endpoint((address, port)), "client_address": address}
    if port != peer[1]:
        fields["listener_client_port"] = peer[1]
    return fields


class Server:
    """The parent's side: answers (id, client, local, protocol) with (id, original or None).

    Served by the worker's own loop (answer_pending when the pipe is
    readable), not by a thread: a thread in the worker's interpreter took the
    interpreter lock from the packets at every question, and measured about
    half the queue path's connections/s.
    """

    def __init__(self, conn) -> None:
        self._conn = conn
        self.lookup: Callable[[Endpoint, Endpoint, int], Asked | None] | None = None  # set once the worker exists
        # Several queue workers: the question goes on to the worker that owns the client, and
        # ask_later(client, local, protocol, reply) calls reply(answer) once that worker answers.
        self.ask_later: Callable[[Endpoint, Endpoint, int, Callable[[tuple | None], None]], None] | None = None

    def fileno(self) -> int:
        return self._conn.fileno()

    def answer_pending(self) -> bool:
        """Answer every question waiting; False once the listener process is gone."""
        try:
            while self._conn.poll(0):
                ident, client, local, protocol = self._conn.recv()
                if self.ask_later is not None:
                    self.ask_later(tuple(client), tuple(local), protocol, partial(self._reply, ident))
                    continue
                lookup = self.lookup
                try:
                    answer = lookup(tuple(client), tuple(local), protocol) if lookup is not None else None
                except Exception:  # noqa: BLE001 - a failed lookup is an unknown origin, not a dead loop
                    answer = None
                self._conn.send((ident, tuple(answer) if answer is not None else None))  # a plain tuple to pickle
        except (EOFError, OSError, ValueError, TypeError):
            return False
        return True

    def _reply(self, ident: int, answer: tuple | None) -> None:
        try:
            self._conn.send((ident, answer))
        except (OSError, ValueError):
            pass  # the listener process is gone: its sentinel stops the run

    def close(self) -> None:
        self._conn.close()


class Client:
    """The listener's side, on its event loop: ask() waits at most `timeout`, and no thread."""

    def __init__(self, conn, timeout: float = ORIGIN_TIMEOUT) -> None:
        self._conn, self._timeout = conn, timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def ask(self, client: Endpoint, local: Endpoint, protocol: int = TCP) -> Asked | None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._answers)
        ident = next(self._ids)
        waiting = self._waiting[ident] = self._loop.create_future()
        try:
            self._conn.send((ident, client[:2], local[:2], protocol))
            return await asyncio.wait_for(waiting, self._timeout)
        except (asyncio.TimeoutError, EOFError, OSError, ValueError):
            return None
        finally:
            self._waiting.pop(ident, None)

    def _answers(self) -> None:
        try:
            while self._conn.poll(0):
                ident, answer = self._conn.recv()
                waiting = self._waiting.get(ident)  # gone: a late answer to a question that timed out
                if waiting is not None and not waiting.done():
                    waiting.set_result(Asked(*answer) if answer is not None else None)
        except (EOFError, OSError, ValueError):
            assert self._loop is not None
            self._loop.remove_reader(self._conn.fileno())  # the parent is gone: every question times out
