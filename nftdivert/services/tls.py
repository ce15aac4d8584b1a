"""The TLS answer: a handshake driven over memory BIOs, then a stream like any other.

Memory BIOs rather than asyncio's start_tls: the ClientHello's first bytes
were already read to recognise it, and every handshake is logged, also one
the client breaks off because it does not trust the certificate. The SNI
callback swaps in the context whose certificate names what the client asked for.
"""

from __future__ import annotations

import asyncio
import ssl

from nftdivert.errors import NftDivertError
from nftdivert.services import certs, recognize

HANDSHAKE_TIMEOUT = 15.0
LINGER = 2.0  # seconds to read what the client still sends after our close_notify and FIN


class Plain:
    """An asyncio stream with the bytes already read put back in front."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b"",
                 count=None) -> None:
        self.reader, self.writer, self._first = reader, writer, first
        self._count = count  # called with each read's size: the listener's byte counter

    async def read(self, n: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:n], self._first[n:]
            return data
        data = await self.reader.read(n)
        if self._count is not None:
            self._count(len(data))
        return data

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()


class Tls:
    """Application data over an established SSLObject on a Plain stream."""

    def __init__(self, plain: Plain, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._plain, self._obj, self._in, self._out = plain, obj, incoming, outgoing
        self._first = b""  # what recognition read inside, put back (prepend)
        self._closed = False  # close_notify sent
        # The client ended first (its close_notify or FIN): nothing more is sent, not even our
        # close_notify, which would meet a socket it has closed and make it answer with a reset.
        self._client_ended = False

    async def read(self, n: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:n], self._first[n:]
            return data
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                data = await self._plain.read()
                if not data:
                    self._client_ended = True
                    return b""
                self._in.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._client_ended = True
                return b""
            except ssl.SSLError:  # garbage inside: the end of the conversation, not a traceback
                return b""

    def prepend(self, first: bytes) -> None:
        self._first = first + self._first

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._obj.write(data)
            self._flush()

    def _flush(self) -> None:
        pending = self._out.read()
        if pending:
            self._plain.write(pending)

    async def drain(self) -> None:
        await self._plain.drain()

    def write_eof(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client_ended:
            return
        try:
            self._obj.unwrap()  # close_notify: the TLS form of the client's EOF
        except ssl.SSLError:
            pass
        self._flush()

    async def close(self) -> None:
        """close_notify, FIN, then read what the client still sends until its own FIN.

        A socket closed with the client's close_notify unread, or arriving
        after the close, answers with a reset: every HTTPS conversation
        ended that way.
        """
        try:
            self.write_eof()
            await self._plain.drain()
            self._plain.write_eof()
            if self._client_ended:
                return
            async with asyncio.timeout(LINGER):
                while await self._plain.read():
                    pass
        except (ConnectionError, OSError, TimeoutError):
            pass


async def handshake(plain: Plain, first: bytes, contexts: certs.Contexts, ip: str,
                    record: dict, name: str | None = None) -> Tls | None:
    """Serve the handshake whose first bytes are `first`; fill `record` (SNI, ALPN, version, result)."""
    record.update(recognize.client_hello(first))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = contexts.get(name, ip)  # no SNI: a certificate for the name a proxy was given, else this address
    obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(first)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANDSHAKE_TIMEOUT
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    plain.write(pending)
                    await plain.drain()
                data = await asyncio.wait_for(plain.read(), max(0.1, deadline - loop.time()))
                if not data:
                    raise ConnectionResetError("the client closed the connection during the handshake")
                incoming.write(data)
    except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
        pending = outgoing.read()  # the alert, if any
        if pending:
            try:
                plain.write(pending)
                await plain.drain()
            except (ConnectionError, OSError):
                pass
        record.update(result="failed", error=_reason(exc), version=obj.version())
        return None
    pending = outgoing.read()
    if pending:
        plain.write(pending)
        await plain.drain()
    record.update(result="ok", version=obj.version(), alpn=obj.selected_alpn_protocol(),
                  cipher=(obj.cipher() or ("",))[0])
    return Tls(plain, obj, incoming, outgoing)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return (getattr(exc, "reason", None) or str(exc) or type(exc).__name__)[:200]


class Upgrade:
    """TLS for one conversation: at once (a ClientHello first) or on STARTTLS.

    Each handshake is logged like any other; the last TLS stream is closed
    cleanly (close_notify, FIN) when the conversation ends.
    """

    def __init__(self, certs, emit, base: dict, ip: str, name: str | None = None) -> None:
        """`certs()`: the Contexts (made on first use); `ip`: the address a leaf names without SNI,
        `name`: the name it names instead (the host a proxy's client asked for)."""
        self._certs, self._emit, self._base, self._ip, self._name = certs, emit, base, ip, name
        self._streams: list = []

    async def __call__(self, stream, first: bytes = b"", starttls: bool = False, base: dict | None = None):
        """The TLS stream over `stream`, or None (the handshake failed, logged)."""
        record = dict(base or self._base, event="tls")
        if starttls:
            record["starttls"] = True
        try:
            contexts = self._certs()
        except NftDivertError as exc:  # no CA (state_dir unusable): logged, not fatal
            self._emit(dict(record, result="failed", error=f"no CA: {exc}"[:200]))
            return None
        if not first:  # after STARTTLS: a ClientHello comes whole in its first segment
            try:
                first = await asyncio.wait_for(stream.read(), HANDSHAKE_TIMEOUT)
            except asyncio.TimeoutError as exc:
                self._emit(dict(record, result="failed", error=_reason(exc)))
                return None
        tls = await handshake(stream, first, contexts, self._ip, record, self._name)
        self._emit(record)
        if tls is not None and base is None:
            self._streams.append(tls)
        return tls

    @property
    def secure(self) -> bool:
        """TLS spoken already: STARTTLS is not offered again."""
        return bool(self._streams)

    async def close(self) -> None:
        if self._streams:
            await self._streams[-1].close()
