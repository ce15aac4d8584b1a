"""SOCKS4, SOCKS4a and SOCKS5 proxies (HTTP CONNECT is http.py's): every tunnel leads back to us.

A sample that is told to use a proxy (or brings its own) asks it for a
host and port; that target is logged, the proxy says yes, and the bytes
inside the tunnel are recognised again by the listener (default_tcp
`_tunnel`): TLS gets a leaf for the name asked for, HTTP the HTTP answer.
Nothing is ever connected onwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

READ_TIMEOUT = 30.0


class Prefixed:
    """A stream with bytes already read put back in front of it."""

    def __init__(self, stream, first: bytes) -> None:
        self._stream, self._first = stream, first

    async def read(self, n: int = 65536) -> bytes:
        if self._first:
            data, self._first = self._first[:n], self._first[n:]
            return data
        return await self._stream.read(n)

    def prepend(self, first: bytes) -> None:
        self._first = first + self._first

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    async def drain(self) -> None:
        await self._stream.drain()

    def write_eof(self) -> None:
        self._stream.write_eof()


def authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def named(host: str, resolver) -> dict:
    """`target_name` for an address the DNS pool gave (a client that resolved first, then asked the proxy)."""
    try:
        name = resolver.name_for(ipaddress.ip_address(host)) if resolver is not None else None
    except ValueError:
        name = None
    return {"target_name": name} if name else {}


def address_or_name(host: str, fallback_ip: str) -> tuple[str, str | None]:
    """(address for a TLS leaf, name for it): a target that is an address is its own leaf."""
    try:
        return str(ipaddress.ip_address(host)), None
    except ValueError:
        return fallback_ip, host


class _Short(Exception):
    """The client closed, or stopped sending, in the middle of its greeting (or sent one we cannot read)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else "the client stopped in the middle of its request"


async def _exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            more = await asyncio.wait_for(stream.read(n - len(data)), READ_TIMEOUT)
        except asyncio.TimeoutError:
            raise _Short() from None
        if not more:
            raise _Short()
        data += more
    return data


async def _until_nul(stream, limit: int = 256) -> bytes:
    data = b""
    while not data.endswith(b"\0"):
        if len(data) > limit:
            raise _Short(f"no NUL within {limit} bytes")
        data += await _exactly(stream, 1)
    return data[:-1]


async def serve_socks(kind: str, stream, emit, base: dict, transports) -> None:
    """Serve a SOCKS greeting and request; log the target; then the tunnel (http.Transports)."""
    rec = dict(base, event="proxy", kind=kind)
    try:
        target = await (_socks5(stream, rec) if kind == "socks5" else _socks4(stream, rec))
    except _Short as exc:
        emit(dict(rec, error=str(exc)))
        return
    if target is None:  # a method or command we do not offer (BIND, UDP ASSOCIATE): logged, and said so
        emit(rec)
        if "error" not in rec:
            stream.write(b"\x05\x07\x00\x01" + b"\0" * 6)
            await stream.drain()
        return
    host, port = target
    emit(dict(rec, target=authority(host, port), **named(host, transports.resolver)))
    await stream.drain()
    if transports.tunnel is not None:
        await transports.tunnel(stream, base, host, port)


async def _socks5(stream, rec: dict) -> tuple[str, int] | None:
    _version, count = await _exactly(stream, 2)
    methods = await _exactly(stream, count)
    if 2 in methods:  # username/password (RFC 1929) before none: a client that has them, gives them to the log
        stream.write(b"\x05\x02")
        await stream.drain()
        _sub, size = await _exactly(stream, 2)
        rec["user"] = (await _exactly(stream, size)).decode("utf-8", "replace")
        rec["password"] = (await _exactly(stream, (await _exactly(stream, 1))[0])).decode("utf-8", "replace")
        stream.write(b"\x01\x00")
    elif 0 in methods:
        stream.write(b"\x05\x00")  # no authentication
    else:  # GSSAPI and the private ones: nothing we speak
        stream.write(b"\x05\xff")
        await stream.drain()
        rec["error"] = f"no method we speak among {list(methods)}"
        return None
    await stream.drain()
    _version, command, _rsv, atyp = await _exactly(stream, 4)
    if atyp == 1:
        host = socket.inet_ntop(socket.AF_INET, await _exactly(stream, 4))
    elif atyp == 4:
        host = socket.inet_ntop(socket.AF_INET6, await _exactly(stream, 16))
    elif atyp == 3:
        host = (await _exactly(stream, (await _exactly(stream, 1))[0])).decode("ascii", "replace")
    else:
        raise _Short(f"address type {atyp}: not one of SOCKS5's")
    port = struct.unpack("!H", await _exactly(stream, 2))[0]
    rec["command"] = {1: "connect", 2: "bind", 3: "udp_associate"}.get(command, str(command))
    if command != 1:
        return None
    # Succeeded, bound to 0.0.0.0:0: clients only look at the status.
    stream.write(b"\x05\x00\x00\x01" + b"\0" * 6)
    return host, port


async def _socks4(stream, rec: dict) -> tuple[str, int] | None:
    head = await _exactly(stream, 8)
    port, address = struct.unpack("!H", head[2:4])[0], head[4:8]
    rec["user"] = (await _until_nul(stream)).decode("utf-8", "replace")
    if address[:3] == b"\0\0\0" and address[3]:  # 0.0.0.x: SOCKS4a, the name follows
        rec["kind"] = "socks4a"
        host = (await _until_nul(stream)).decode("ascii", "replace")
    else:
        host = socket.inet_ntop(socket.AF_INET, address)
    rec["command"] = "connect"
    stream.write(b"\x00\x5a" + head[2:8])  # granted
    return host, port
