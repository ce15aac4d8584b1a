"""POP3 and IMAP: any login succeeds, is logged, and finds an empty mailbox.

Small state machines by hand: a client that only logs in and looks needs
nothing more, and no maintained server library answers for any mailbox.
Each login is one log record (event "pop3" or "imap") with the user and
password offered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re

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


async def say(stream, *lines: str) -> None:
    stream.write("".join(line + "\r\n" for line in lines).encode())
    await stream.drain()


def plain_credentials(encoded: str) -> dict:
    """SASL PLAIN (authzid NUL user NUL password), base64: the user and password in it."""
    try:
        parts = base64.b64decode(encoded, validate=True).decode("utf-8", "replace").split("\0")
    except (binascii.Error, ValueError):
        return {"data": encoded[:256]}
    return {"user": parts[1], "password": parts[2]} if len(parts) == 3 else {"data": encoded[:256]}


# -- POP3 (RFC 1939) -----------------------------------------------------------

def pop3_answer(command: str, state: dict) -> tuple[list[str], dict | None, bool]:
    """(reply lines, a login record or None, close?) for one POP3 command line."""
    verb, _, arg = command.partition(" ")
    verb = verb.upper()
    if verb == "USER":
        state["user"] = arg
        return ["+OK"], None, False
    if verb == "PASS":
        return ["+OK maildrop has 0 messages (0 octets)"], {"user": state.get("user", ""), "password": arg}, False
    if verb == "APOP":
        user, _, digest = arg.partition(" ")
        return ["+OK maildrop has 0 messages (0 octets)"], {"user": user, "apop_digest": digest}, False
    if verb == "CAPA":
        return ["+OK", "USER", "UIDL", "TOP", "."], None, False
    if verb == "STAT":
        return ["+OK 0 0"], None, False
    if verb in ("LIST", "UIDL"):
        return (["-ERR no such message"] if arg else ["+OK 0 messages", "."]), None, False
    if verb in ("NOOP", "RSET"):
        return ["+OK"], None, False
    if verb == "QUIT":
        return ["+OK bye"], None, True
    if verb in ("RETR", "TOP", "DELE"):
        return ["-ERR no such message"], None, False
    return ["-ERR unknown command"], None, False


async def serve_pop3(stream, hostname: str, emit, base: dict) -> None:
    lines, state = Lines(stream), {}
    await say(stream, f"+OK {hostname} POP3 server ready")
    for _ in range(MAX_COMMANDS):
        command = await lines.next()
        if command is None:
            return
        reply, login, close = pop3_answer(command, state)
        if login is not None:
            emit(dict(base, event="pop3", **login))
        await say(stream, *reply)
        if close:
            return


# -- IMAP (RFC 3501) -----------------------------------------------------------

_ATOM_OR_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
CAPABILITY = "CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN"


def imap_arguments(text: str) -> list[str]:
    """Atoms and quoted strings (backslash escapes undone)."""
    return [re.sub(r"\\(.)", r"\1", q) if q or not a else a for q, a in _ATOM_OR_QUOTED.findall(text)]


def imap_answer(command: str) -> tuple[list[str], dict | None, bool]:
    """(reply lines, a login record or None, close?) for one IMAP command line (not AUTHENTICATE)."""
    tag, _, rest = command.partition(" ")
    verb, _, arg = rest.partition(" ")
    verb = verb.upper()
    if verb == "UID":
        verb, _, arg = arg.partition(" ")
        verb = verb.upper()
    ok = f"{tag} OK {verb} completed"
    if verb == "CAPABILITY":
        return [f"* {CAPABILITY}", ok], None, False
    if verb == "LOGIN":
        args = imap_arguments(arg)
        login = {"user": args[0] if args else "", "password": args[1] if len(args) > 1 else ""}
        return [ok], login, False
    if verb in ("SELECT", "EXAMINE"):
        return ["* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)", "* 0 EXISTS", "* 0 RECENT",
                "* OK [UIDVALIDITY 1] UIDs valid", "* OK [UIDNEXT 1] Predicted next UID",
                f"{tag} OK [{'READ-ONLY' if verb == 'EXAMINE' else 'READ-WRITE'}] {verb} completed"], None, False
    if verb in ("LIST", "LSUB"):
        return [f'* {verb} (\\HasNoChildren) "/" INBOX', ok], None, False
    if verb == "STATUS":
        return ["* STATUS INBOX (MESSAGES 0 RECENT 0 UIDNEXT 1 UIDVALIDITY 1 UNSEEN 0)", ok], None, False
    if verb == "SEARCH":
        return ["* SEARCH", ok], None, False
    if verb in ("FETCH", "STORE", "NOOP", "CHECK", "CLOSE", "EXPUNGE", "SUBSCRIBE", "UNSUBSCRIBE", "CREATE",
                "DELETE", "RENAME", "COPY", "APPEND", "ID", "ENABLE", "NAMESPACE"):
        return [ok], None, False
    if verb == "LOGOUT":
        return ["* BYE logging out", ok], None, True
    return [f"{tag} BAD unknown command"], None, False


async def serve_imap(stream, hostname: str, emit, base: dict) -> None:
    lines = Lines(stream)
    await say(stream, f"* OK [{CAPABILITY}] {hostname} IMAP4rev1 ready")
    for _ in range(MAX_COMMANDS):
        command = await lines.next()
        if command is None:
            return
        tag, _, rest = command.partition(" ")
        verb, _, arg = rest.partition(" ")
        if verb.upper() == "AUTHENTICATE":
            login = await _imap_authenticate(stream, lines, arg)
            if login is None:
                return
            emit(dict(base, event="imap", **login))
            await say(stream, f"{tag} OK AUTHENTICATE completed")
            continue
        reply, login, close = imap_answer(command)
        if login is not None:
            emit(dict(base, event="imap", **login))
        await say(stream, *reply)
        if close:
            return


async def _imap_authenticate(stream, lines: Lines, arg: str) -> dict | None:
    mechanism, _, initial = arg.partition(" ")
    mechanism = mechanism.upper()
    if mechanism == "LOGIN":  # two challenges: the user, then the password, each base64
        got = []
        for prompt in ("VXNlcm5hbWU6", "UGFzc3dvcmQ6"):
            await say(stream, f"+ {prompt}")
            line = await lines.next()
            if line is None:
                return None
            got.append(_b64(line))
        return {"mechanism": "LOGIN", "user": got[0], "password": got[1]}
    if not initial:
        await say(stream, "+ ")
        initial = await lines.next()
        if initial is None:
            return None
    return {"mechanism": mechanism, **(plain_credentials(initial) if mechanism == "PLAIN" else {"data": initial[:256]})}


def _b64(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return text[:256]
