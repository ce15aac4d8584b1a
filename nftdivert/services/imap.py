"""IMAP: any login succeeds, is logged, and finds the mailbox of `inbox`; APPENDed messages are kept.

A small state machine by hand, like POP3's (mailbox.py). Each login is one
log record (event "imap") with the user and password offered; a message
APPENDed (exfiltration to a folder) is kept like a mail ("imap_append").
STARTTLS upgrades the conversation (`upgrade`, the listener's TLS,
offered unless already spoken).
"""

from __future__ import annotations

import base64
import binascii
import re

from nftdivert.services import inbox
from nftdivert.services.inbox import Message
from nftdivert.services.mailbox import MAX_COMMANDS, Lines, plain_credentials, say
from nftdivert.services.mailstore import headers, keep

MAX_LITERAL = 64 * 1024 * 1024  # bytes of one literal (an APPENDed message); larger ends the conversation

_ATOM_OR_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
CAPABILITY = "CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN AUTH=LOGIN"
FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"


def imap_arguments(text: str) -> list[str]:
    """Atoms and quoted strings (backslash escapes undone)."""
    return [re.sub(r"\\(.)", r"\1", q) if q or not a else a for q, a in _ATOM_OR_QUOTED.findall(text)]


def sequence(text: str, count: int) -> list[int]:
    """The message numbers of an IMAP sequence set ("1", "2:*", "1,3"), within 1..count."""
    picked: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition(":")
        try:
            first = count if low == "*" else int(low)
            last = first if not high else count if high == "*" else int(high)
        except ValueError:
            continue
        first, last = sorted((first, last))
        picked.update(range(max(first, 1), min(last, count) + 1))
    return sorted(picked)


_SECTION = re.compile(r"(BODY(?:\.PEEK)?\[([^\]]*)\](?:<[\d.]+>)?|RFC822(?:\.SIZE|\.HEADER|\.TEXT)?|UID|FLAGS|"
                      r"INTERNALDATE|ENVELOPE|BODYSTRUCTURE|BODY)", re.I)


def _literal(text: str) -> str:
    return f"{{{len(text.encode('utf-8', 'surrogateescape'))}}}\r\n{text}"


def fetch(number: int, message: Message, items: str, uid: bool) -> str:
    """One untagged FETCH answer for message `number` (its UID too)."""
    parts = [] if not uid else [f"UID {number}"]
    for match in _SECTION.finditer(items):
        item, section = match.group(1).upper(), (match.group(2) or "").upper()
        if item == "UID":
            if not uid:
                parts.append(f"UID {number}")
        elif item == "FLAGS":
            parts.append("FLAGS (\\Seen)")
        elif item == "RFC822.SIZE":
            parts.append(f"RFC822.SIZE {message.size}")
        elif item == "INTERNALDATE":
            parts.append('INTERNALDATE "01-Jan-2024 00:00:00 +0000"')
        elif item in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            if item != "ENVELOPE":
                parts.append(f'{item} ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" {len(message.body)} '
                             f'{message.body.count(chr(10))})')
        elif item.startswith(("RFC822", "BODY")):
            name = item.replace(".PEEK", "")
            part = ("HEADER" if item == "RFC822.HEADER" or section.startswith("HEADER")
                    else "TEXT" if item == "RFC822.TEXT" or section == "TEXT" else "")
            text = message.header if part == "HEADER" else message.body if part == "TEXT" else message.text
            parts.append(f"{name.split('<')[0]} {_literal(text)}")
    return f"* {number} FETCH ({' '.join(parts)})"


def imap_answer(command: str, box: tuple[Message, ...] = ()) -> tuple[list[str], dict | None, bool]:
    """(reply lines, a login record or None, close?) for one IMAP command line (not AUTHENTICATE)."""
    tag, _, rest = command.partition(" ")
    verb, _, arg = rest.partition(" ")
    verb = verb.upper()
    uid = verb == "UID"
    if uid:
        verb, _, arg = arg.partition(" ")
        verb = verb.upper()
    ok = f"{tag} OK {verb} completed"
    count = len(box)
    if verb == "CAPABILITY":
        return [f"* {CAPABILITY}", ok], None, False
    if verb == "LOGIN":
        args = imap_arguments(arg)
        login = {"user": args[0] if args else "", "password": args[1] if len(args) > 1 else ""}
        return [ok], login, False
    if verb in ("SELECT", "EXAMINE"):
        return [f"* FLAGS {FLAGS}", f"* {count} EXISTS", "* 0 RECENT",
                "* OK [UIDVALIDITY 1] UIDs valid", f"* OK [UIDNEXT {count + 1}] Predicted next UID",
                f"{tag} OK [{'READ-ONLY' if verb == 'EXAMINE' else 'READ-WRITE'}] {verb} completed"], None, False
    if verb in ("LIST", "LSUB"):
        return [f'* {verb} (\\HasNoChildren) "/" INBOX', ok], None, False
    if verb == "STATUS":
        return [f"* STATUS INBOX (MESSAGES {count} RECENT 0 UIDNEXT {count + 1} UIDVALIDITY 1 UNSEEN 0)", ok], None, False
    if verb == "SEARCH":
        return [" ".join(["* SEARCH", *map(str, range(1, count + 1))]), ok], None, False
    if verb == "FETCH":
        numbers, _, items = arg.partition(" ")
        return [*(fetch(n, box[n - 1], items, uid) for n in sequence(numbers, count)), ok], None, False
    if verb == "STORE":
        numbers = arg.partition(" ")[0]
        return [*(f"* {n} FETCH (FLAGS (\\Seen))" for n in sequence(numbers, count)), ok], None, False
    if verb in ("NOOP", "CHECK", "CLOSE", "EXPUNGE", "SUBSCRIBE", "UNSUBSCRIBE", "CREATE",
                "DELETE", "RENAME", "COPY", "APPEND", "ID", "ENABLE", "NAMESPACE", "UNSELECT"):
        return [ok], None, False
    if verb == "LOGOUT":
        return ["* BYE logging out", ok], None, True
    return [f"{tag} BAD unknown command"], None, False


async def serve(stream, config, emit, base: dict, upgrade=None) -> None:
    lines = Lines(stream)
    box = inbox.load(config.mailbox_dir, config.hostname)
    starttls = upgrade is not None and not upgrade.secure
    capability = CAPABILITY + (" STARTTLS" if starttls else "")
    await say(stream, f"* OK Dovecot at {config.hostname} is ready.")  # as scanners know it
    for _ in range(MAX_COMMANDS):
        command = await lines.next()
        got = await _literals(stream, lines, command) if command is not None else None
        if got is None:
            return
        command, literals = got
        tag, _, rest = command.partition(" ")
        verb, _, arg = rest.partition(" ")
        verb = verb.upper()
        if verb == "APPEND" and literals:  # a message uploaded: exfiltration over IMAP, kept like a mail
            folder = (imap_arguments(arg) or [""])[0]
            emit(dict(base, event="imap_append", mailbox=folder[:256], headers=headers(literals[-1]),
                      **keep(config.mail_dir, literals[-1], ".eml")))
            await say(stream, f"{tag} OK APPEND completed")
            continue
        if verb == "AUTHENTICATE":
            login = await _imap_authenticate(stream, lines, arg)
            if login is None:
                return
            emit(dict(base, event="imap", **login))
            await say(stream, f"{tag} OK AUTHENTICATE completed")
            continue
        if verb == "STARTTLS" and starttls:
            await say(stream, f"{tag} OK Begin TLS negotiation now")
            stream, starttls = await upgrade(stream, starttls=True), False
            if stream is None:
                return
            lines, capability = Lines(stream), CAPABILITY  # the clear's leftovers are forgotten (RFC 3501 6.2.1)
            continue
        if verb == "CAPABILITY":
            await say(stream, f"* {capability}", f"{tag} OK CAPABILITY completed")
            continue
        reply, login, close = imap_answer(command, box)
        if login is not None:
            emit(dict(base, event="imap", **login))
        await say(stream, *reply)
        if close:
            return


_LITERAL = re.compile(r"\{(\d{1,12})(\+?)\}$")


async def _literals(stream, lines: Lines, command: str) -> tuple[str, list[bytes]] | None:
    """The command with its literals ({n} then n bytes) read: each in the text as a quoted string, and raw."""
    literals: list[bytes] = []
    while (match := _LITERAL.search(command)) and len(literals) < 16:
        size = int(match[1])
        if size > MAX_LITERAL:
            return None
        if not match[2]:  # LITERAL+ sends at once; a synchronising literal waits for this
            await say(stream, "+ Ready for literal data")
        data = await lines.exactly(size)
        rest = await lines.next() if data is not None else None
        if rest is None:
            return None
        literals.append(data)
        text = data[:1024].decode("utf-8", "replace").replace("\\", "\\\\").replace('"', '\\"')
        command = command[:match.start()] + f'"{text}"' + rest
    return command, literals


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
