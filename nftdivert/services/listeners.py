"""Built-in listeners: accept anything, count what arrives, and answer it.
A TCP listener of kind echo recognises the protocol first (default_tcp):
TLS, HTTP, SSH and the server-first protocols get real answers, anything
else its own bytes back; one of a protocol's kind (http, smtp...) speaks
only that. A UDP listener of kind echo answers by the port the client asked
for (default_udp: NTP, TFTP, syslog...), else echoes.

They run on one asyncio loop in a thread, so hundreds of conversations cost
no thread each; `nftdivert run` puts them in processes of their own
(listener_process), which share the ports with SO_REUSEPORT. Any other program can be a listener (kind = "external").
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nftdivert.config import (Config, CustomRule, HttpConfig, Listener, RecognizeConfig, ServerFirstConfig,
                              SmallServicesConfig, TlsConfig)
from nftdivert.profiles import Profiles
from nftdivert.tasks import TaskTable
from nftdivert.services import active, handoff, origin as origin_mod, pool_channel
from nftdivert.services.default_tcp import DefaultTcp, Emit, Origin, endpoint as _endpoint
from nftdivert.services.default_udp import DefaultUdp

if TYPE_CHECKING:
    from nftdivert.services.dns import Resolver


@dataclass
class ListenerStats:
    conversations: int = 0
    bytes_received: int = 0


@dataclass
class _Running:
    listener: Listener
    stats: ListenerStats = field(default_factory=ListenerStats)


def _probe(kind: int, port: int, family: int) -> None:
    """Raise OSError if anyone holds the port, even in a SO_REUSEPORT group: the first of several
    listener processes checks, so no other program's sockets (or another run's) share its ports."""
    with socket.socket(family, kind) as probe:
        if kind == socket.SOCK_STREAM:  # TIME_WAIT leftovers are no holder; a listening socket still is
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))


def _socket(kind: int, port: int, ipv6: bool, shared: bool = False, first: bool = True) -> socket.socket:
    # One dual-stack socket answers IPv4 and IPv6 (redirect keeps the family).
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    if shared and first:
        _probe(kind, port, family)
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:  # several listener processes: the kernel spreads connections and datagrams by their tuple
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if kind == socket.SOCK_STREAM:
        # Urgent data stays in the stream (accepted sockets inherit this), so
        # the echo has it where the client put it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::" if ipv6 else "0.0.0.0", port))
    return sock


# Linux's IP_PKTINFO (linux/in.h); Python's socket module does not name it.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def _reply_source(family: int, ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """The control message that makes a reply leave from the address the datagram came to."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {ifindex; spec_dst; addr}: the header's destination is `addr`.
            if family == socket.AF_INET:
                return [(level, kind, b"\0" * 4 + data[8:12] + b"\0" * 4)]
            # On the dual-stack socket an IPv4 reply takes it as a mapped in6_pktinfo.
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                     b"\0" * 10 + b"\xff\xff" + data[8:12] + b"\0\0\0\0")]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return [(level, kind, data[:20])]
    return []


def _local_endpoint(ancillary: list[tuple[int, int, bytes]], port: int) -> tuple[str, int] | None:
    """The address and port a datagram came to (its header's destination), as the origin question names it."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12]), port
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            return socket.inet_ntop(socket.AF_INET6, data[:16]).removeprefix("::ffff:"), port
    return None


class _Datagrams:
    """A UDP listener: `answer(data, client, local)` turns a datagram into the reply (or None), or
    into an awaitable of it (then the reply is sent when it is ready).

    Each reply leaves from the address its datagram was sent to. A wildcard
    socket would otherwise answer from whatever source the route picks: in
    local mode the host's own address instead of the 127.0.0.1 that NAT gave
    the conversation, so conntrack could not match the reply. Where that
    address cannot be a source (broadcast, multicast), the route picks one.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, stats: ListenerStats, answer) -> None:
        self.loop, self.sock, self.stats, self.answer = loop, sock, stats, answer
        self._pending: set[asyncio.Task] = set()  # answers waiting for the original destination
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # IPv4, also on the dual-stack socket
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(64):  # a turn, so one busy listener cannot hold the loop
            try:
                data, ancillary, _flags, addr = self.sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.stats.conversations += 1
            self.stats.bytes_received += len(data)
            reply = self.answer(data, addr, _local_endpoint(ancillary, self.sock.getsockname()[1]))
            if asyncio.iscoroutine(reply):
                task = self.loop.create_task(self._send_when_ready(reply, ancillary, addr))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            elif reply is not None:
                self._send(reply, ancillary, addr)

    async def _send_when_ready(self, reply, ancillary, addr) -> None:
        data = await reply
        if data is not None and self.sock.fileno() >= 0:
            self._send(data, ancillary, addr)

    def _send(self, reply: bytes, ancillary, addr) -> None:
        try:
            self.sock.sendmsg([reply], _reply_source(self.sock.family, ancillary), 0, addr)
        except OSError:
            try:  # not an address we may send from: let the route choose
                self.sock.sendto(reply, addr)
            except OSError:
                pass

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        for task in self._pending:
            task.cancel()
        self.sock.close()


def _echo(data: bytes, _addr, _local) -> bytes:
    return data


class Listeners:
    """Start with start(), stop with stop(); ports are bound when start() returns."""

    def __init__(self, listeners: tuple[Listener, ...], ipv6: bool = True, resolver: Resolver | None = None,
                 http: HttpConfig = HttpConfig(), tls: TlsConfig = TlsConfig(),
                 recognize: RecognizeConfig = RecognizeConfig(), on_event: Emit | None = None,
                 origin: Origin | None = None, server_first: ServerFirstConfig = ServerFirstConfig(),
                 origin_in_kernel: bool = False, small: SmallServicesConfig = SmallServicesConfig(),
                 custom: tuple[CustomRule, ...] = (), shared: bool = False, first: bool = True,
                 askers=(), profiles: Profiles | None = None) -> None:
        self._running = [_Running(lst) for lst in listeners if lst.kind != "external"]
        # SO_REUSEPORT: other listener processes bind the same ports, after the first found them free.
        self._shared, self._first = shared, first
        self._resolver = resolver  # dns.Resolver, or in a process that does not own the pool pool_channel.Remote
        self._askers = askers  # the other processes' channels to this one's pool (pool_channel)
        self._owner: pool_channel.Owner | None = None
        # What the TCP listeners' protocols need (DefaultTcp's arguments after the name).
        self._answers = (http, tls, recognize, on_event, origin, server_first, origin_in_kernel, small)
        self._udp_answers = (on_event, origin, small, server_first)  # DefaultUdp's arguments after the name
        self._custom = custom
        self._profiles = profiles  # [[profiles]]: other answers for some clients; None: these for all
        self._chosen = TaskTable()  # the tasks that chose a profile for their clients (choose())
        self._defaults: list = []  # the DefaultTcp and DefaultUdp answers: a reload gives them new rules
        self._ipv6 = ipv6 and socket.has_ipv6
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nftdivert-listeners", daemon=True)
        self._closers: list = []

    @property
    def stats(self) -> dict[str, ListenerStats]:
        return {r.listener.name: r.stats for r in self._running}

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        from nftdivert.services import custom

        # Scripts load here, once: one that does not load stops the start, saying why.
        self._served = custom.serving(self._profiles or Profiles(Config(custom=self._custom, http=self._answers[0])),
                                      self._resolver)
        if self._profiles is not None and self._resolver is not None:
            self._resolver.set_answers(self._profiles)
        if self._askers and self._resolver is not None:
            self._owner = pool_channel.Owner(self._loop, self._resolver, list(self._askers))
        siblings = handoff.current
        if siblings is not None:  # FTP data connections other listener processes accepted
            siblings.on_handed = self._handed
            self._loop.add_reader(siblings.fileno(), siblings.read)
        for run in self._running:
            lst = run.listener
            try:
                await self._start_one(run)
            except OSError as exc:
                raise OSError(exc.errno, f"listener {lst.name} ({lst.protocol} port {lst.port}): {exc.strerror}") from None

    async def _start_one(self, run: _Running) -> None:
        lst, stats = run.listener, run.stats
        if lst.kind == "dns" and self._resolver is None:
            raise ValueError("a dns listener needs a resolver")
        if lst.protocol == "tcp":
            sock = _socket(socket.SOCK_STREAM, lst.port, self._ipv6, self._shared, self._first)
            if lst.kind == "dns":
                handler = functools.partial(self._dns_stream, stats=stats)
            else:
                answers = DefaultTcp(lst.name, *self._answers, fixed=None if lst.kind == "echo" else lst.kind,
                                     resolver=self._resolver,  # DNS over HTTPS asks the DNS listener's pool
                                     served=self._served)
                self._defaults.append(answers)
                handler = functools.partial(self._tcp_stream, stats=stats, answers=answers)
            server = await asyncio.start_server(handler, sock=sock, backlog=1024)
            self._closers.append(server)
        else:
            sock = _socket(socket.SOCK_DGRAM, lst.port, self._ipv6, self._shared, self._first)
            resolver = self._resolver
            if lst.kind == "dns":
                answer = lambda data, addr, local: resolver.answer(  # noqa: E731
                    data, _endpoint(addr), local[0] if local is not None else "")
            else:  # echo: the default answer by the port asked for
                udp = DefaultUdp(lst.name, *self._udp_answers, served=self._served)
                self._defaults.append(udp)
                answer = udp.answer
            self._closers.append(_Datagrams(self._loop, sock, stats, answer))

    def reload(self, profiles: Profiles) -> None:
        """New answers ([[custom]], [http], [dns] records, every client's and each profile's) from now on;
        OSError (one line) if a script does not load, and then the old ones stay."""
        asyncio.run_coroutine_threadsafe(self._reload(profiles), self._loop).result(timeout=30)

    def choose(self, tasks: TaskTable) -> None:
        """The tasks that chose a profile for their clients (tasks.TaskTable.choosing), from now on:
        one reference replaced, which the loop reads per conversation and per question."""
        self._chosen = tasks
        if self._profiles is not None:
            self._profiles.chosen = tasks

    async def _reload(self, profiles: Profiles) -> None:
        from nftdivert.services import custom

        custom.forget_scripts()
        profiles.chosen = self._chosen  # a reload changes the profiles, not which tasks chose them
        self._served = custom.serving(profiles, self._resolver)
        self._profiles = profiles
        for answers in self._defaults:
            answers.reload(self._served)
        if self._resolver is not None:
            self._resolver.set_answers(profiles)

    async def _dns_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: ListenerStats) -> None:
        # DNS over TCP: each message behind a two-byte length (RFC 1035 4.2.2).
        stats.conversations += 1
        try:
            while True:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                query = await reader.readexactly(size)
                stats.bytes_received += 2 + size
                reply = self._resolver.answer(query, _endpoint(writer.get_extra_info("peername")),
                                              writer.get_extra_info("sockname")[0]) if self._resolver else None
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _tcp_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: ListenerStats,
                          answers: DefaultTcp) -> None:
        stats.conversations += 1

        def count(n: int) -> None:
            stats.bytes_received += n

        try:
            await answers.serve(reader, writer, count)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _handed(self, sock: socket.socket, listener: str, read: bytes) -> None:
        """A data connection a sibling accepted for a session of ours; not counted again as a conversation."""
        from nftdivert.services import ftp
        from nftdivert.services.tls import Plain

        stats = self.stats.get(listener, ListenerStats())
        stats.bytes_received += len(read)

        def count(n: int) -> None:
            stats.bytes_received += n

        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            ask, in_kernel = self._answers[4], self._answers[6]
            peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            if in_kernel:
                original = origin_mod.of_socket(sock)
            else:
                original = await ask(peer[:2], local[:2]) if ask is not None else None
            done = original and ftp.claim(peer[0].removeprefix("::ffff:"), original[1], Plain(reader, writer, read, count))
            if done:
                await done
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            for closer in self._closers:
                closer.close()
            if self._owner is not None:
                self._owner.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            active.unroute()  # active FTP's routing rule, if a transfer added it
