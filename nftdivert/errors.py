"""Errors, how each is shown, and the exit status each one means.

The CLI decides exits here only. Values from the user reach messages through
`shown()` and `clip()`, so a 5 MB string or a control character never makes a
5 MB or multi-line error.
"""

from __future__ import annotations

import reprlib
import sys

EXIT_OK = 0
EXIT_FAILURE = 1  # kernel refused, drift found, worker failed, table owned by another run
EXIT_USAGE = 2  # bad input: nothing was applied

MESSAGE_VALUE_CHARS = 80  # how much of a bad value a message repeats
MESSAGE_LINE_CHARS = 240  # how long one line of a message may grow

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MESSAGE_VALUE_CHARS
_repr.maxlevel = 3  # a list nested 1000 deep is shown as [[[...]]], not walked


def clip(text: str, limit: int = MESSAGE_LINE_CHARS) -> str:
    """`text` on one line, at most `limit` characters, saying how much was left out."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def shown(value: object) -> str:
    """A bad value as a message repeats it: repr, bounded in length and depth."""
    return clip(_repr.repr(value))


class NftDivertError(Exception):
    exit_status = EXIT_FAILURE


class ConfigError(NftDivertError):
    """Bad input, named precisely enough to fix without reading the source."""

    exit_status = EXIT_USAGE

    def __init__(self, key: str, value: object, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{clip(key)} = {shown(value)}: {clip(reason)}")


class KernelError(NftDivertError):
    """The kernel (through libnftables or iptables-nft) refused or failed."""


class PermissionProblem(NftDivertError):
    """Needs privileges we do not have and cannot get."""


class TableTaken(NftDivertError):
    """Another live nftdivert owns the table in this network namespace."""


class DriftFound(NftDivertError):
    """Not an error to report: the exit status says it (drift, or nothing loaded)."""


def say(message: str) -> None:
    """One line for the user on stderr, named as every message of ours is, shown at once."""
    print(f"nftdivert: {message}", file=sys.stderr, flush=True)


def usage_line(message: str, command: str | None) -> str:
    """The one line for a command line the parser refused (an unknown option, a missing argument)."""
    hint = f" (see `{clip(command)} --help`)" if command else ""
    return f"nftdivert: bad usage: {clip(' '.join(message.split()).rstrip('.'))}{hint}"


def report(exc: Exception) -> tuple[str, int]:
    """(the one line to print, the exit status) for an error that ends a command.

    Anything not listed here is a bug and is raised again, traceback and all.
    """
    if isinstance(exc, DriftFound):
        return "", EXIT_FAILURE
    if isinstance(exc, ConfigError):
        return f"nftdivert: bad config: {exc}", EXIT_USAGE
    if isinstance(exc, NftDivertError):
        return f"nftdivert: {exc}", exc.exit_status
    if isinstance(exc, UnicodeError):  # text that is not UTF-8 reached us from outside
        return f"nftdivert: bad input: not UTF-8 text ({clip(str(exc))})", EXIT_USAGE
    if isinstance(exc, OSError):  # a file or the system failed us mid-way (disk full, EIO)
        where = f"{clip(str(exc.filename))}: " if exc.filename else ""
        return f"nftdivert: {where}{exc.strerror or clip(str(exc))}", EXIT_FAILURE
    raise exc
