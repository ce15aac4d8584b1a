"""The default TCP answer: recognise the protocol from the first bytes, then serve it.

A ClientHello gets TLS (and the protocol inside is recognised again), an
HTTP request gets the HTTP answer, an SSH banner the SSH answer, anything
else the echo. A client that
stays silent for `[recognize] wait` seconds gets the protocol that speaks
first on the port it asked for (recognize.server_first), else the echo. Each TLS
handshake and HTTP request is handed to `emit` as a log record.

Proxies and HTTP/2 (C2 below): a SOCKS greeting or an HTTP CONNECT opens a
tunnel whose bytes are recognised again, as if the client had connected to
the target it named; the HTTP/2 preface (h2c, or inside TLS after ALPN h2)
gets the HTTP answer per stream.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Awaitable, Callable

from nftdivert.config import HttpConfig, RecognizeConfig, ServerFirstConfig, TlsConfig
from nftdivert.errors import NftDivertError
from nftdivert.services import origin as origin_mod, recognize
from nftdivert.services.tls import Plain, handshake

C2 = ("socks4", "socks5", "h2c")  # recognised kinds served by proxy.py and http2.py
MAX_TUNNELS = 8  # proxies inside proxies' tunnels (a chain), per conversation
_tunnels = contextvars.ContextVar("tunnels", default=0)  # each conversation is a task of its own

Emit = Callable[[dict], None]
# (client, local) as the listener's socket sees them -> what the client asked for; blocks briefly.
Origin = Callable[[tuple, tuple], Awaitable["tuple[str, int] | None"]]


def endpoint(addr) -> str:
    host, port = addr[0], addr[1]
    host = host.removeprefix("::ffff:")  # IPv4 on the dual-stack socket
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
            more = await asyncio.wait_for(read(recognize.PEEK_BYTES - len(data)), left)
        except asyncio.TimeoutError:
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


class DefaultTcp:
    def __init__(self, name: str, http: HttpConfig, tls: TlsConfig, recognize_: RecognizeConfig,
                 emit: Emit | None, origin: Origin | None = None,
                 first: ServerFirstConfig = ServerFirstConfig(), origin_in_kernel: bool = False,
                 fixed: str | None = None, resolver=None) -> None:
        self._name, self._http, self._tls, self._wait = name, http, tls, recognize_.wait
        self._emit = emit or (lambda _rec: None)
        self._origin = origin
        # The kernel path: the socket's own conntrack entry names the original destination.
        self._origin_in_kernel = origin_in_kernel
        self._first = first
        self._fixed = fixed  # a listener kind that speaks one protocol (http, https, smtp...); None: recognise
        self._contexts = None  # the CA is made on the first TLS handshake, not before
        self._resolver = resolver  # the DNS listener's, for DNS over HTTPS; None without one

    def _certs(self):
        if self._contexts is None:
            from nftdivert.services import certs  # cryptography: only once TLS is spoken

            tls = self._tls
            self._contexts = certs.Contexts(certs.ensure_ca(tls.state_dir), tls.max_certs, tls.keylog,
                                            alpn=("h2", "http/1.1"))
        return self._contexts

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count) -> None:
        peer, sock = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        base = {"client": endpoint(peer), "client_address": peer[0].removeprefix("::ffff:"), "listener": self._name}
        # Queue path: asked alongside the first bytes, so the wait for them hides
        # the round trip. Kernel path: a getsockopt, when something needs it.
        asked = (asyncio.ensure_future(self._original(peer, sock))
                 if self._origin is not None and not self._origin_in_kernel else None)
        if await self._ftp_data(asked, reader, writer, count, peer):
            return
        fixed = self._fixed
        server_first = fixed not in (None, "http", "https")
        first = b"" if server_first else await first_bytes(reader.read, self._wait)
        count(len(first))
        echoed = fixed is None and first and recognize.classify(first) == "other"
        # An unknown protocol is echoed: unless already asked, nothing asks where it went.
        original = None if echoed and asked is None else await self._origin_of(asked, writer)
        if original is not None:
            base["original_destination"] = endpoint(original)
        if fixed is not None:
            kind = {"https": "tls"}.get(fixed, fixed)
            if kind == "http" and recognize.classify(first) == "h2c":  # HTTP's listener speaks HTTP/2 too
                kind = "h2c"
        else:  # silent: the port the client asked for chooses
            kind = (recognize.classify(first) if first
                    else recognize.server_first(original[1] if original else None) or "other")
        plain = Plain(reader, writer, first if kind in ("http", "ssh", *C2) else b"", count)
        await self._answer(kind, plain, first, base, peer, sock, original, fixed)

    async def _answer(self, kind: str, plain, first: bytes, base: dict, peer, sock, original, fixed,
                      name: str | None = None) -> None:
        """Serve what was recognised; `name`: the host a proxy's client named, for the TLS leaf."""
        if kind == "tls":
            record = dict(base, event="tls")
            try:
                contexts = self._certs()
            except NftDivertError as exc:  # no CA (state_dir unusable): logged, not fatal
                self._emit(dict(record, result="failed", error=f"no CA: {exc}"[:200]))
                return
            # No SNI: the leaf names the address the client asked for.
            ip = original[0] if original is not None else sock[0].removeprefix("::ffff:")
            stream = await handshake(plain, first, contexts, ip, record, name)
            self._emit(record)
            if stream is None:
                return
            inner = await first_bytes(stream.read, self._wait)
            stream.prepend(inner)
            inside = recognize.server_first(original[1] if original else None) if not inner else None
            inner_kind = recognize.classify(inner)
            if inner_kind in C2:
                await self._serve_c2(inner_kind, stream, base, "https", peer, sock)
            elif fixed == "https" or inner_kind == "http":
                await self._serve_http(stream, base, "https", peer, sock)
            elif inside is not None:  # implicit TLS (SMTPS on 465): the protocol by the port, inside
                await self._serve_first(inside, stream, base, peer, sock, original)
            else:
                await echo(stream, await stream.read())
        elif kind == "http":
            await self._serve_http(plain, base, "http", peer, sock)
        elif kind in C2:
            await self._serve_c2(kind, plain, base, "http", peer, sock)
        elif kind != "other":
            await self._serve_first(kind, plain, base, peer, sock, original)
        else:
            await echo(plain, first or await plain.read())

    async def _ftp_data(self, asked, reader, writer, count, peer) -> bool:
        """An FTP session's data connection (silent until the session speaks): handed to it, not recognised."""
        from nftdivert.services import ftp

        if not ftp.expecting():
            return False
        original = await self._origin_of(asked, writer)
        done = original and ftp.claim(peer[0].removeprefix("::ffff:"), original[1], Plain(reader, writer, b"", count))
        if done:
            await done
        return bool(done)

    async def _origin_of(self, asked, writer) -> tuple[str, int] | None:
        if asked is not None:
            return await asked
        if self._origin_in_kernel:  # the kernel path: the socket's own conntrack entry names it
            return origin_mod.of_socket(writer.get_extra_info("socket"))
        return None  # nobody to ask

    async def _original(self, peer, sock) -> tuple[str, int] | None:
        return await self._origin(peer[:2], sock[:2])

    async def _serve_first(self, kind: str, stream, base: dict, peer, sock, original) -> None:
        """A protocol that speaks first; each imports its library only once spoken."""
        first, emit = self._first, self._emit
        if kind == "smtp":
            from nftdivert.services import smtp

            await smtp.serve(stream, first, emit, base, peer)
        elif kind in ("pop3", "imap"):
            from nftdivert.services import mailbox

            serve = mailbox.serve_pop3 if kind == "pop3" else mailbox.serve_imap
            await serve(stream, first.hostname, emit, base)
        elif kind == "ftp":
            from nftdivert.services import ftp

            asked = original[0] if original is not None else sock[0].removeprefix("::ffff:")
            await ftp.serve(stream, first, emit, base, peer, asked)
        elif kind == "ssh":
            from nftdivert.services import ssh

            await ssh.serve(stream, first, emit, base, peer, sock)

    async def _serve_http(self, stream, base: dict, scheme: str, peer, sock) -> None:
        from nftdivert.services import http  # h11: only once HTTP is spoken

        await http.serve(stream, self._http, self._emit, base, scheme, self._transports(peer, sock))

    def _transports(self, peer, sock):
        from nftdivert.services import http

        async def tunnel(stream, base: dict, host: str, port: int) -> None:
            await self._tunnel(stream, base, host, port, peer, sock)

        return http.Transports(tunnel=tunnel, resolver=self._resolver)

    async def _serve_c2(self, kind: str, stream, base: dict, scheme: str, peer, sock) -> None:
        transports = self._transports(peer, sock)
        if kind == "h2c":
            from nftdivert.services import http2  # h2: only once HTTP/2 is spoken

            await http2.serve(stream, self._http, self._emit, base, scheme, transports)
        else:
            from nftdivert.services import proxy

            await proxy.serve_socks(kind, stream, self._emit, base, transports)

    async def _tunnel(self, stream, base: dict, host: str, port: int, peer, sock) -> None:
        """A proxy's tunnel: its bytes recognised again, as if the client had connected to host:port."""
        from nftdivert.services import proxy

        base = dict(base, tunnel=proxy.authority(host, port))
        if _tunnels.get() >= MAX_TUNNELS:
            self._emit(dict(base, event="proxy", error=f"more than {MAX_TUNNELS} tunnels inside each other"))
            return
        _tunnels.set(_tunnels.get() + 1)
        first = await first_bytes(stream.read, self._wait)
        kind = recognize.classify(first) if first else recognize.server_first(port) or "other"
        ip, name = proxy.address_or_name(host, sock[0].removeprefix("::ffff:"))
        plain = proxy.Prefixed(stream, first if kind in ("http", "ssh", *C2) else b"")
        await self._answer(kind, plain, first, base, peer, sock, (ip, port), None, name)
