"""WebSocket (RFC 6455) after an HTTP/1.1 upgrade: 101, then every message logged and answered.

A message is logged whole (`websocket` record: size, sha256, its first
bytes) and answered by the first `[[http.rules]]` whose host and path match
the upgrade's (its body or file, as one message of the same kind), else
echoed: a C2 channel that waits for its tasking sees an answer. Frames are
wsproto's; the handshake was h11's (http.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from pathlib import Path

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from nftdivert.config import HttpConfig
from nftdivert.services import http

HEAD_BYTES = 64  # of each message, in the log
MAX_MESSAGE = 16 * 1024 * 1024  # a message is kept whole to answer it; a bigger one closes the channel (1009)
IDLE_TIMEOUT = 300.0  # a C2 channel is often quiet for a while


async def serve(conn: h11.Connection, send, stream, cfg: HttpConfig, emit, base: dict, host: str, target: str,
                headers: list[tuple[str, str]]) -> None:
    key = next((v for k, v in headers if k.lower() == "sec-websocket-key"), "")
    offered = next((v for k, v in headers if k.lower() == "sec-websocket-protocol"), "")
    extra = [("Sec-WebSocket-Protocol", offered.split(",")[0].strip())] if offered else []
    await send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols", headers=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", generate_accept_token(key.encode("latin-1")).decode()), *extra]))
    ws = Connection(ConnectionType.SERVER, trailing_data=conn.trailing_data[0])
    rule = http.match_rule(cfg.rules, host, urllib.parse.urlsplit(target).path or "/")
    parts: list = []
    size = 0
    while ws.state is ConnectionState.OPEN:
        for event in ws.events():
            if isinstance(event, Message):
                parts.append(event.data)
                size += len(event.data)
                if size > MAX_MESSAGE:
                    emit(dict(base, event="websocket", error=f"a message beyond {MAX_MESSAGE} bytes"))
                    stream.write(ws.send(CloseConnection(code=1009)))
                    break
                if not event.message_finished:
                    continue
                size = 0
                message, parts = _joined(parts), []
                stream.write(ws.send(_reply(message, rule, emit, base)))
            elif isinstance(event, Ping):
                stream.write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                stream.write(ws.send(event.response()))
        await stream.drain()
        if ws.state is not ConnectionState.OPEN:
            break
        try:
            data = await asyncio.wait_for(stream.read(65536), IDLE_TIMEOUT)
        except asyncio.TimeoutError:
            break
        ws.receive_data(data or None)  # None: the client went without a close frame
        if not data:
            break
    stream.write_eof()


def _joined(parts: list) -> str | bytes:
    return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)


def _reply(message: str | bytes, rule, emit, base: dict) -> Message:
    raw = message.encode() if isinstance(message, str) else message
    text = isinstance(message, str)
    emit(dict(base, event="websocket", opcode="text" if text else "binary", size=len(raw),
              sha256=hashlib.sha256(raw).hexdigest(), head=raw[:HEAD_BYTES].hex(),
              answered="rule" if rule is not None else "echo"))
    if rule is None:
        return TextMessage(data=message) if text else BytesMessage(data=message)
    body = Path(rule.file).read_bytes() if rule.file else rule.body.encode()
    return TextMessage(data=body.decode("utf-8", "replace")) if text else BytesMessage(data=body)
