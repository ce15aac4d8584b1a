"""POP3 and IMAP: any login succeeds, is logged, and finds the mailbox of `inbox`.

Small state machines by hand: a client that logs in, looks and reads needs
nothing more, and no maintained server library answers for any mailbox.
Each login is one log record (event "pop3" or "imap") with the user and
password offered; a message APPENDed is kept like a mail ("imap_append"). STLS and STARTTLS upgrade the conversation (`upgrade`,
the listener's TLS, offered unless already spoken).
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from nftdivert.services import inbox
from nftdivert.services.inbox import Message

IDLE_TIMEOUT = 60.0  # seconds a client may say nothing before it is closed
MAX_LINE = 8192
MAX_COMMANDS = 1000


class Lines:
    """Lines read from a stream, CRLF or LF ended, bounded."""

    def __init__(self, stream) -> None:
        self._stream, self._buffer = stream, b""

    async def next(self) -> str | None:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_LINE:
                return None
            data = await asyncio.wait_for(self._stream.read(4096), IDLE_TIMEOUT)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode("utf-8", "replace")

    async def exactly(self, size: int) -> bytes | None:
        """The next `size` bytes (an IMAP literal); None if the client goes first."""
        while len(self._buffer) < size:
            data = await asyncio.wait_for(self._stream.read(65536), IDLE_TIMEOUT)
            if not data:
                return None
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


async def say(stream, *lines: str) -> None:
    stream.write("".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape"))
    await stream.drain()


def plain_credentials(encoded: str) -> dict:
    """SASL PLAIN (authzid NUL user NUL password), base64: the user and password in it."""
    try:
        parts = base64.b64decode(encoded, validate=True).decode("utf-8", "replace").split("\0")
    except (binascii.Error, ValueError):
        return {"data": encoded[:256]}
    return {"user": parts[1], "password": parts[2]} if len(parts) == 3 else {"data": encoded[:256]}


def _dotted(text: str) -> list[str]:
    """A multi-line POP3 answer's lines, dot-stuffed, with the final dot."""
    return [("." + line if line.startswith(".") else line) for line in text.split("\r\n")[:-1]] + ["."]


def _pick(box: tuple[Message, ...], arg: str) -> int | None:
    number = arg.split(" ", 1)[0]
    return int(number) if number.isdigit() and 1 <= int(number) <= len(box) else None


def pop3_answer(command: str, state: dict, box: tuple[Message, ...] = ()) -> tuple[list[str], dict | None, bool]:
    """(reply lines, a login record or None, close?) for one POP3 command line."""
    verb, _, arg = command.partition(" ")
    verb = verb.upper()
    total = sum(m.size for m in box)
    drop = f"+OK maildrop has {len(box)} messages ({total} octets)"
    if verb == "USER":
        state["user"] = arg
        return ["+OK"], None, False
    if verb == "PASS":
        return [drop], {"user": state.get("user", ""), "password": arg}, False
    if verb == "APOP":
        user, _, digest = arg.partition(" ")
        return [drop], {"user": user, "apop_digest": digest}, False
    if verb == "CAPA":
        return ["+OK", "USER", "UIDL", "TOP", *(["STLS"] if state.get("stls") else []), "."], None, False
    if verb == "STAT":
        return [f"+OK {len(box)} {total}"], None, False
    if verb in ("NOOP", "RSET"):
        return ["+OK"], None, False
    if verb == "QUIT":
        return ["+OK bye"], None, True
    if verb in ("LIST", "UIDL") and not arg:
        listed = [f"{n} {m.size if verb == 'LIST' else n}" for n, m in enumerate(box, 1)]
        return [f"+OK {len(box)} messages", *listed, "."], None, False
    number = _pick(box, arg)
    if verb not in ("LIST", "UIDL", "RETR", "TOP", "DELE"):
        return ["-ERR unknown command"], None, False
    if number is None:
        return ["-ERR no such message"], None, False
    message = box[number - 1]
    if verb == "LIST":
        return [f"+OK {number} {message.size}"], None, False
    if verb == "UIDL":
        return [f"+OK {number} {number}"], None, False
    if verb == "DELE":
        return [f"+OK message {number} deleted"], None, False
    if verb == "RETR":
        return [f"+OK {message.size} octets", *_dotted(message.text)], None, False
    lines = arg.split(" ")[1:2]
    return ["+OK", *_dotted(inbox.top(message, int(lines[0]) if lines and lines[0].isdigit() else 0))], None, False


async def serve_pop3(stream, config, emit, base: dict, upgrade=None) -> None:
    lines, state = Lines(stream), {"stls": upgrade is not None and not upgrade.secure}
    box = inbox.load(config.mailbox_dir, config.hostname)
    await say(stream, f"+OK Dovecot on {config.hostname} ready.")  # as scanners know it
    for _ in range(MAX_COMMANDS):
        command = await lines.next()
        if command is None:
            return
        if command.upper() == "STLS" and state["stls"]:
            state["stls"] = False
            await say(stream, "+OK Begin TLS negotiation")
            stream = await upgrade(stream, starttls=True)
            if stream is None:
                return
            lines = Lines(stream)  # what was sent in the clear is forgotten (RFC 2595 4)
            continue
        reply, login, close = pop3_answer(command, state, box)
        if login is not None:
            emit(dict(base, event="pop3", **login))
        await say(stream, *reply)
        if close:
            return
