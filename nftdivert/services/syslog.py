"""Syslog over UDP (514): each message a record, nothing answered (RFC 3164 and 5424 send no reply).

Malware logs to a remote syslog to exfiltrate, or a dropper's installer
logs its progress there; the priority is split into facility and severity.
"""

from __future__ import annotations

import re

MAX_MESSAGE = 2048  # characters of a message the record keeps
_PRI = re.compile(rb"<(\d{1,3})>")
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def record(datagram: bytes) -> dict:
    """The log fields of one syslog datagram: facility, severity and the message after the priority."""
    fields: dict = {"size": len(datagram)}
    match = _PRI.match(datagram)
    body = datagram
    if match is not None and int(match.group(1)) <= 191:
        pri = int(match.group(1))
        fields.update(facility=pri >> 3, severity=SEVERITIES[pri & 7])
        body = datagram[match.end():]
    fields["message"] = body.decode("utf-8", "replace").rstrip("\r\n\0")[:MAX_MESSAGE]
    return fields
