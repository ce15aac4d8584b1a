"""The default TCP answer: recognise the protocol from the first bytes, then serve it.

A ClientHello gets TLS (and the protocol inside is recognised again), an
HTTP request gets the HTTP answer, an SSH banner the SSH answer, a
server-first protocol's command that protocol, anything else the echo
(recognize.choose; answers.ANSWERS names each protocol's service). A client
that stays silent for `[recognize] wait` seconds on a port whose protocol
speaks first gets its greeting; elsewhere the listener waits on for its
first bytes. Each TLS handshake and HTTP request is handed to `emit` as a
log record.

Proxies and HTTP/2 (C2 below): a SOCKS greeting or an HTTP CONNECT opens a
tunnel whose bytes are recognised again, as if the client had connected to
the target it named; the HTTP/2 preface (h2c, or inside TLS after ALPN h2)
gets the HTTP answer per stream.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Awaitable, Callable

from nftdivert.netlink.ipproto import TCP
from nftdivert.observers.flowid import of_sockets
from nftdivert.config import HttpConfig, RecognizeConfig, ServerFirstConfig, SmallServicesConfig, TlsConfig
from nftdivert.services import handoff, origin as origin_mod, recognize, small_services
from nftdivert.services.answers import ANSWERS, Conversation, asked_address
from nftdivert.services.tls import Plain, Upgrade

C2 = ("socks4", "socks5", "h2c")  # recognised kinds served by proxy.py and http2.py
MAX_TUNNELS = 8  # proxies inside proxies' tunnels (a chain), per conversation
_tunnels = contextvars.ContextVar("tunnels", default=0)  # each conversation is a task of its own
# The conversation's answers (custom.Served), chosen once at its start: a reload meanwhile changes
# neither its HTTP answers nor the profile its records name. None: the listener's own.
_serving = contextvars.ContextVar("serving", default=None)

Emit = Callable[[dict], None]
# (client, local) as the listener's socket sees them -> what the client asked for; blocks briefly.
Origin = Callable[[tuple, tuple], Awaitable["origin_mod.Asked | None"]]


endpoint = origin_mod.endpoint  # "192.0.2.2:40000", as the log writes it


def _asked(base: dict, peer, original) -> None:
    """The conversation's client and what it asked for, once known, in the record's base."""
    base.update(origin_mod.client_fields(peer, original))
    base["original_destination"] = endpoint(original)
    base["community_id"] = of_sockets(TCP, (peer[0], origin_mod.client_port(peer, original)), original)


async def first_bytes(read, wait: float) -> bytes:
    """At most PEEK_BYTES, waiting at most `wait` seconds for them; b"" if the client is silent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    data = b""
    while not data or recognize.wants_more(data):
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the task's
            # cancellation when the read completes at the same moment, and the conversation
            # then outlives whoever cancelled it (a proxy's tunnel after its session ended).
            async with asyncio.timeout(left):
                more = await read(recognize.PEEK_BYTES - len(data))
        except TimeoutError:
            break
        if not more:
            break
        data += more
    return data


async def echo(stream, first: bytes) -> None:
    data = first
    while data:
        stream.write(data)
        await stream.drain()
        data = await stream.read(65536)
    stream.write_eof()  # half-close: the client's EOF, echoed


SILENT = 3600.0  # a client silent on a port that does not greet: what it says first still chooses


def _port(original) -> int | None:
    return original[1] if original is not None else None


class DefaultTcp:
    def __init__(self, name: str, http: HttpConfig, tls: TlsConfig, recognize_: RecognizeConfig,
                 emit: Emit | None, origin: Origin | None = None,
                 first: ServerFirstConfig = ServerFirstConfig(), origin_in_kernel: bool = False,
                 small: SmallServicesConfig = SmallServicesConfig(), fixed: str | None = None,
                 resolver=None, custom=None, served=None) -> None:
        self._name, self._http, self._tls, self._wait = name, http, tls, recognize_.wait
        self._emit = emit or (lambda _rec: None)
        self._origin = origin
        # The kernel path: the socket's own conntrack entry names the original destination.
        self._origin_in_kernel = origin_in_kernel
        self._first, self._small = first, small
        self._fixed = fixed  # a listener kind that speaks one protocol (http, https, smtp...); None: recognise
        self._contexts = None  # the CA is made on the first TLS handshake, not before
        self._resolver = resolver  # the DNS listener's, for DNS over HTTPS; None without one
        self._custom = custom  # custom.Rules: the analyst's answers, by original destination; None: none
        # custom.ServedFor: a client's [[custom]] and [http] by its profile; None: the ones above for all
        self._served = served

    def reload(self, served) -> None:
        """A reload's answers (custom.ServedFor): new conversations get them."""
        self._served = served

    def _conversation_http(self) -> HttpConfig:
        served = _serving.get()
        return served.http if served is not None else self._http

    def _certs(self):
        if self._contexts is None:
            from nftdivert.services import certs  # cryptography: only once TLS is spoken

            tls = self._tls
            self._contexts = certs.Contexts(certs.ensure_ca(tls.state_dir), tls.max_certs, tls.keylog,
                                            alpn=("h2", "http/1.1"))
        return self._contexts

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count) -> None:
        peer, sock = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        served = self._served(peer[0].removeprefix("::ffff:")) if self._served is not None else None
        _serving.set(served)
        base = {**origin_mod.client_fields(peer, None), **(served.fields() if served else {}), "listener": self._name}
        # Queue path: asked alongside the first bytes, so the wait for them hides
        # the round trip. Kernel path: a getsockopt, when something needs it.
        asked = (asyncio.ensure_future(self._original(peer, sock))
                 if self._origin is not None and not self._origin_in_kernel else None)
        if await self._ftp_data(asked, reader, writer, count, peer):
            return
        custom = served.tcp if served is not None else self._custom
        if custom and self._fixed is None and await self._answer_custom(custom, asked, reader, writer, count, base,
                                                                        peer):
            return
        fixed = self._fixed
        server_first = fixed not in (None, "http", "https")
        first = b"" if server_first else await first_bytes(reader.read, self._wait)
        count(len(first))
        original, known = None, False
        if fixed is None and not first:  # silent: greet on a server-first port, else wait on
            original, known = await self._origin_of(asked, writer), True
            if not (recognize.greets(_port(original)) or small_services.speaks_first(_port(original))):
                first = await first_bytes(reader.read, SILENT)
                count(len(first))
        if not known:  # even an unknown protocol's port may name a small service (finger on 79)
            original = await self._origin_of(asked, writer)
        if original is not None:
            _asked(base, peer, original)
        port = _port(original)
        kind = {"https": "tls"}.get(fixed, fixed) if fixed is not None else recognize.choose(first, port)
        if fixed is None and kind in ("other", "ftp", "pop3"):  # a small service by its port or words (IRC, finger...)
            small = small_services.kind_for(first, original)
            if small is not None and (kind == "other" or small == "irc" and small_services.is_irc(first)):
                kind = small
        if kind == "http" and recognize.classify(first) == "h2c":  # HTTP's listener speaks HTTP/2 too
            kind = "h2c"
        if kind in small_services.KINDS:
            await small_services.serve(kind, Plain(reader, writer, first, count), self._small, self._emit, base, peer)
            return
        plain = Plain(reader, writer, b"" if kind in ("tls", "other") else first, count)
        await self._answer(kind, plain, first, base, peer, sock, original)

    async def _answer(self, kind: str, plain, first: bytes, base: dict, peer, sock, original,
                      name: str | None = None) -> None:
        """Serve what was recognised; `name`: the host a proxy's client named, for the TLS leaf."""
        # No SNI: a leaf for that name, else for the address the client asked for.
        upgrade = Upgrade(self._certs, self._emit, base, asked_address(original, sock), name)
        try:
            if kind == "tls":
                stream = await upgrade(plain, first)
                if stream is not None:
                    await self._inside(stream, base, peer, sock, original, upgrade)
            elif kind in ANSWERS:
                await ANSWERS[kind](self._conversation(plain, base, peer, sock, original, upgrade, "http"))
            else:
                await echo(plain, first or await plain.read())
        finally:
            await upgrade.close()

    async def _inside(self, stream, base: dict, peer, sock, original, upgrade: "Upgrade") -> None:
        """The protocol inside TLS: recognised again; implicit TLS (465, 993...) by the port."""
        port = _port(original)
        inner = await first_bytes(stream.read, self._wait)
        if not inner and self._fixed != "https" and recognize.server_first(port) is None:
            inner = await first_bytes(stream.read, SILENT)
        stream.prepend(inner)
        kind = recognize.choose(inner, port, inside_tls=True)
        if kind not in C2 and self._fixed == "https":  # HTTP/2 after ALPN h2 or a proxy, else HTTPS' answer
            kind = "http"
        if kind in ANSWERS:
            await ANSWERS[kind](self._conversation(stream, base, peer, sock, original, upgrade, "https"))
        elif (small := small_services.kind_for(inner, original)) is not None:  # IRC over TLS (6697)
            await small_services.serve(small, stream, self._small, self._emit, base, peer)
        else:
            await echo(stream, await stream.read())

    async def _answer_custom(self, custom, asked, reader, writer, count, base: dict, peer) -> bool:
        """The analyst's answer, when a [[custom]] rule matches (before any byte is read: it may speak first)."""
        original = await self._origin_of(asked, writer)
        matched = custom.match(original)
        if matched is None:
            return False
        _asked(base, peer, original)
        await custom.serve_tcp(matched, Plain(reader, writer, b"", count), base, self._emit,
                                     lambda read: first_bytes(read, self._wait))
        return True

    async def _ftp_data(self, asked, reader, writer, count, peer) -> bool:
        """An FTP session's data connection (silent until the session speaks): handed to it, not recognised."""
        from nftdivert.services import ftp

        siblings = handoff.current
        if not ftp.expecting() and not (siblings is not None and siblings.expecting()):
            return False
        original = await self._origin_of(asked, writer)
        if not original:
            return False
        client = peer[0].removeprefix("::ffff:")
        done = ftp.claim(client, original[1], Plain(reader, writer, b"", count))
        if done:
            await done
            return True
        if siblings is not None and siblings.owner(client, original[1]) is not None:
            # Another process's session: the socket goes there with what was read already.
            read = bytes(reader._buffer)  # noqa: SLF001 - the transport reads ahead of us
            if siblings.hand_over(client, original[1], writer.get_extra_info("socket"), self._name, read):
                return True
        return False

    async def _origin_of(self, asked, writer) -> origin_mod.Asked | None:
        if asked is not None:
            return await asked
        if self._origin_in_kernel:  # the kernel path: the socket's own conntrack entry names it
            return origin_mod.of_socket(writer.get_extra_info("socket"))
        return None  # nobody to ask

    async def _original(self, peer, sock) -> origin_mod.Asked | None:
        return await self._origin(peer[:2], sock[:2])

    def _conversation(self, stream, base: dict, peer, sock, original, upgrade: Upgrade,
                      scheme: str) -> Conversation:
        return Conversation(stream, base, peer, sock, original, upgrade, scheme, self._emit,
                            self._conversation_http(),
                            self._first, lambda: self._transports(peer, sock))

    def _transports(self, peer, sock):
        from nftdivert.services import http

        async def tunnel(stream, base: dict, host: str, port: int) -> None:
            await self._tunnel(stream, base, host, port, peer, sock)

        return http.Transports(tunnel=tunnel, resolver=self._resolver)

    async def _tunnel(self, stream, base: dict, host: str, port: int, peer, sock) -> None:
        """A proxy's tunnel: its bytes recognised again, as if the client had connected to host:port."""
        from nftdivert.services import proxy

        base = dict(base, tunnel=proxy.authority(host, port))
        if _tunnels.get() >= MAX_TUNNELS:
            self._emit(dict(base, event="proxy", error=f"more than {MAX_TUNNELS} tunnels inside each other"))
            return
        _tunnels.set(_tunnels.get() + 1)
        first = await first_bytes(stream.read, self._wait)
        kind = recognize.choose(first, port)
        ip, name = proxy.address_or_name(host, sock[0].removeprefix("::ffff:"))
        plain = proxy.Prefixed(stream, b"" if kind in ("tls", "other") else first)
        await self._answer(kind, plain, first, base, peer, sock, (ip, port), name)
