"""Which small service a TCP conversation gets, and serving it: by the port the client asked
for (daytime on 13, finger on 79...), or IRC by its first words on any port.

The default TCP listener asks here once TLS, HTTP, SSH and the server-first
protocols did not claim the conversation; each service's module is imported
only once it is spoken.
"""

from __future__ import annotations

import itertools
import re

from nftdivert.config import SmallServicesConfig
from nftdivert.services import clock, recognize

PORTS = {7: "echo", 9: "discard", 13: "daytime", 17: "qotd", 19: "chargen", 37: "time", 79: "finger",
         113: "ident", 6667: "irc", 6697: "irc"}
KINDS = frozenset(PORTS.values()) - {"echo"}  # the echo is the listener's own answer
# An IRC client's registration starts with one of these (RFC 2812 3.1; CAP from IRCv3).
_IRC = re.compile(rb"(?:(?:NICK|USER|PASS|CAP) \S)", re.IGNORECASE)
# ... and only an IRC client's USER has four parameters (FTP's and POP3's have one).
_IRC_SURE = re.compile(rb"(?:(?:NICK|PASS|CAP) \S|USER \S+ \S+ \S+ )", re.IGNORECASE)
_quotes = itertools.count()


def speaks_first(port: int | None) -> bool:
    """Does the small service on this port answer a client that says nothing (Time, Daytime...)?"""
    return PORTS.get(port) in ("time", "daytime", "qotd", "chargen")


def is_irc(first: bytes) -> bool:
    """First words only an IRC client sends (USER as FTP or POP3 sends it is not)."""
    return bool(_IRC_SURE.match(first))


def kind_for(first: bytes, original: tuple[str, int] | None) -> str | None:
    """The small service for these first bytes (b"": the client is silent) and original destination."""
    port = original[1] if original is not None else None
    # USER and PASS also begin a POP3 or FTP client that did not wait for the greeting: its port decides.
    if _IRC.match(first) and recognize.server_first(port) is None:
        return "irc"
    by_port = PORTS.get(port)
    return by_port if by_port in KINDS else None


async def serve(kind: str, stream, config: SmallServicesConfig, emit, base: dict, peer) -> None:
    from nftdivert.services import simple

    if kind == "irc":
        from nftdivert.services import irc

        await irc.serve(stream, emit, base, config.irc_server, peer[0].removeprefix("::ffff:"))
    elif kind in ("finger", "ident"):
        await simple.serve_query(stream, emit, base, kind)
    elif kind == "discard":
        await simple.serve_discard(stream, emit, base)
    elif kind == "chargen":
        await simple.serve_chargen(stream, emit, base)
    else:  # the ones that speak and close: time, daytime, qotd
        now = clock.now(config.clock_offset)
        answer = (clock.time_answer(now) if kind == "time" else clock.daytime_answer(now) if kind == "daytime"
                  else simple.quote(next(_quotes)))
        await simple.serve_spoken(stream, emit, base, kind, answer)
