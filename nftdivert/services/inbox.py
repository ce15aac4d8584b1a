"""The messages POP3 and IMAP serve: `[server_first] mailbox_dir`'s .eml files, or one neutral message.

A sample that polls a mailbox for its commands reads message 1; an empty
mailbox would show nothing of what it does next. Messages are text decoded
with surrogateescape, so each byte of a file goes out as it is.
"""

from __future__ import annotations

import email.utils
import os
from dataclasses import dataclass

MAX_MESSAGES = 100
MAX_MESSAGE = 10 * 1024 * 1024  # bytes of one .eml served; longer files are skipped
WELCOMED = 1704067200  # the welcome message's date: 2024-01-01, as every listing's


@dataclass(frozen=True)
class Message:
    text: str  # CRLF line ends

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8", "surrogateescape"))

    @property
    def header(self) -> str:
        """The header fields and the blank line after them."""
        head, sep, _body = self.text.partition("\r\n\r\n")
        return head + sep

    @property
    def body(self) -> str:
        return self.text.partition("\r\n\r\n")[2]


def _crlf(data: bytes) -> str:
    text = data.decode("utf-8", "surrogateescape").replace("\r\n", "\n").replace("\n", "\r\n")
    return text if text.endswith("\r\n") else text + "\r\n"


def neutral(hostname: str) -> Message:
    return Message(_crlf(
        f"Return-Path: <admin@{hostname}>\nFrom: Administrator <admin@{hostname}>\nTo: user@{hostname}\n"
        f"Subject: Welcome\nDate: {email.utils.formatdate(WELCOMED, usegmt=True)}\nMessage-ID: <1@{hostname}>\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\nWelcome to your new mailbox.\n".encode()))


def load(directory: str, hostname: str) -> tuple[Message, ...]:
    """The directory's .eml files (name order, bounded), else the neutral message."""
    found = []
    try:
        names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".eml")) if directory else []
    except OSError:
        names = []
    for name in names[:MAX_MESSAGES]:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                data = f.read(MAX_MESSAGE + 1)
        except OSError:
            continue
        if len(data) <= MAX_MESSAGE:
            found.append(Message(_crlf(data)))
    return tuple(found) or (neutral(hostname),)


def top(message: Message, lines: int) -> str:
    """The header and the first `lines` lines of the body (POP3 TOP)."""
    body = message.body.split("\r\n")[:-1][:max(lines, 0)]
    return message.header + "".join(line + "\r\n" for line in body)
