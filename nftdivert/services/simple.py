"""The small TCP/IP services a sample may probe: Echo (7), Discard (9),
Quote of the Day (17), Chargen (19), Finger (79) and Ident (113).

Each answers as its RFC says, and what the client said is handed to `emit`
(the finger query, the ident query, the size and hash of what was
discarded). Stream handlers take the listener's stream; the UDP forms are
pure functions of the datagram.
"""

from __future__ import annotations

import asyncio
import hashlib
import re

READ_TIMEOUT = 30.0  # seconds a finger or ident client may take to send its query line
MAX_QUERY = 1024
CHARGEN_LINE = 72
CHARGEN_MAX = 1 << 20  # bytes a TCP chargen sends before it closes: a client that never stops reading is still served
DISCARD_MAX = 1 << 30  # bytes a discard conversation reads before it closes

_PRINTABLE = bytes(range(32, 127))  # RFC 864: the 95 printing ASCII characters
# Short sayings of our own: what a qotd server sends is any text below 512 bytes.
QUOTES = (
    "The early bird gets the worm, but the second mouse gets the cheese.",
    "A watched pot never boils; an unwatched one boils over.",
    "Measure twice, cut once.",
    "Every road is long when you walk it alone.",
)
_IDENT = re.compile(r"\s*(\d{1,5})\s*,\s*(\d{1,5})\s*")


def chargen_lines(start: int, count: int) -> bytes:
    """`count` lines of the rotating pattern, the first starting at character `start`."""
    doubled = _PRINTABLE * 2
    return b"".join(doubled[(start + i) % len(_PRINTABLE):][:CHARGEN_LINE] + b"\r\n" for i in range(count))


def chargen_datagram() -> bytes:
    """RFC 864 over UDP: one datagram of up to 512 characters, whatever the client sent."""
    return chargen_lines(0, 512 // (CHARGEN_LINE + 2))


def quote(counter: int) -> bytes:
    return QUOTES[counter % len(QUOTES)].encode() + b"\r\n"


def finger_answer(query: str) -> bytes:
    """RFC 1288: a user's entry for "user" (or "/W user", "user@host"), the list of users for "" ."""
    user = query.removeprefix("/W").strip().split("@", 1)[0].strip()
    if not user:
        return b"Login     Name          Tty      Idle  Login Time   Office\r\nadmin     Administrator pts/0       1d  Nov 28 09:12\r\n"
    safe = re.sub(r"[^A-Za-z0-9._-]", "", user)[:32] or "user"
    return (f"Login: {safe:<32} Name: {safe}\r\nDirectory: /home/{safe:<25} Shell: /bin/bash\r\n"
            "Last login Fri Nov 27 17:04 (UTC) on pts/0\r\nNo mail.\r\nNo Plan.\r\n").encode()


def ident_answer(query: str, user: str = "user") -> bytes:
    """RFC 1413: "server-port, client-port" gets the ports back with a user id, anything else an error."""
    match = _IDENT.fullmatch(query)
    if match is None or not all(1 <= int(p) <= 65535 for p in match.groups()):
        return f"{query.strip()[:64]} : ERROR : INVALID-PORT\r\n".encode()
    server, client = match.groups()
    return f"{server}, {client} : USERID : UNIX : {user}\r\n".encode()


async def query_line(stream) -> str | None:
    """The one line a finger or ident client sends; None if it closes or stays silent."""
    data = b""
    while b"\n" not in data and len(data) < MAX_QUERY:
        try:
            more = await asyncio.wait_for(stream.read(MAX_QUERY), READ_TIMEOUT)
        except asyncio.TimeoutError:
            return None
        if not more:
            break
        data += more
    return data.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace") if data else None


async def serve_query(stream, emit, base: dict, event: str) -> None:
    """Finger or ident: one query line, logged, and its answer."""
    query = await query_line(stream)
    if query is None:
        return
    emit(dict(base, event=event, query=query[:256]))
    stream.write(finger_answer(query) if event == "finger" else ident_answer(query))
    await stream.drain()


async def serve_discard(stream, emit, base: dict) -> None:
    digest, size = hashlib.sha256(), 0
    while size < DISCARD_MAX:
        data = await stream.read(65536)
        if not data:
            break
        digest.update(data)
        size += len(data)
    emit(dict(base, event="discard", size=size, sha256=digest.hexdigest()))


async def serve_chargen(stream, emit, base: dict) -> None:
    """Lines until the client closes (or CHARGEN_MAX bytes); what it sends is read and dropped."""
    emit(dict(base, event="chargen"))
    sent, line = 0, 0
    drop = asyncio.ensure_future(_drain_input(stream))
    try:
        while sent < CHARGEN_MAX and not drop.done():
            block = chargen_lines(line, 64)
            stream.write(block)
            await stream.drain()
            sent, line = sent + len(block), line + 64
    finally:
        drop.cancel()


async def _drain_input(stream) -> None:
    while await stream.read(65536):
        pass


async def serve_spoken(stream, emit, base: dict, event: str, answer: bytes) -> None:
    """Time, Daytime, QOTD over TCP: the answer at once, then the close."""
    emit(dict(base, event=event))
    stream.write(answer)
    await stream.drain()
