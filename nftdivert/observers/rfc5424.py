"""A record as a syslog message: RFC 5424, framed by octet counting (RFC 6587) for TCP (pure).

    <134>1 2026-11-28T04:14:59.439Z gw1 nftdivert 4242 start - {"v": 1, ...}

PRI is the facility times 8 plus severity 6 (informational): every record
is an observation, none an error of ours. TIMESTAMP is the record's own
`time`, MSGID its `event`, STRUCTURED-DATA empty ("-"), MSG the JSON record.
The JSON is ASCII (json.dumps escapes the rest), so MSG needs no BOM.
Octet counting, not a newline after each message: a record never needs
escaping, whatever its strings hold.
"""
from __future__ import annotations

from dataclasses import dataclass

INFORMATIONAL = 6
NIL = "-"


def _printable(text: str, limit: int) -> str:
    """RFC 5424's PRINTUSASCII, at most `limit` characters; NIL for nothing (or nothing valid)."""
    kept = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return kept or NIL


@dataclass(frozen=True)
class Header:
    """What every message of a run shares."""

    facility: int
    hostname: str
    app_name: str
    procid: int

    def message(self, json_text: str, time: str | None, event: str | None) -> bytes:
        pri = self.facility * 8 + INFORMATIONAL
        return (f"<{pri}>1 {_printable(time or '', 32)} {_printable(self.hostname, 255)} "
                f"{_printable(self.app_name, 48)} {self.procid} {_printable(event or '', 32)} {NIL} "
                f"{json_text}").encode("utf-8")


def frame(message: bytes) -> bytes:
    """RFC 6587's octet-counting framing: the message's length in bytes, a space, the message."""
    return b"%d %s" % (len(message), message)

