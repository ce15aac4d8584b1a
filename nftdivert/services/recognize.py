"""What protocol a client speaks, from its first bytes (pure functions).

The default TCP listener reads at most the first bytes of a conversation,
waiting a short while for them, and picks the answer from them: TLS, HTTP,
a command a server-first protocol's client sends (EHLO, USER, a tagged
IMAP command...), or the echo. A client that says nothing first expects
the server to speak (SMTP, FTP, POP3, IMAP, SSH): `server_first` picks it
by the port the client asked for.
"""

from __future__ import annotations

import re
import struct

PEEK_BYTES = 4096  # enough for any request line and a ClientHello's first record

_HTTP_METHOD = re.compile(rb"(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT|PROPFIND|[A-Z]{3,10}) \S")
_HTTP_REQUEST = re.compile(rb"[A-Z]{3,10} \S+ HTTP/1\.[01]\r?\n")
_TLS_VERSIONS = {0x0300: "SSLv3", 0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}


def classify(first: bytes, port: int | None = None) -> str:
    """'tls', 'http', 'ssh', a server-first protocol, 'h2c', 'socks4', 'socks5' or 'other'
    for the first bytes a client sent.

    `port`, the port the client asked for, settles a command two protocols
    share (USER: FTP or POP3).
    """
    # A TLS record: handshake (22), a 3.x version, then a ClientHello (1).
    if len(first) >= 6 and first[0] == 0x16 and first[1] == 3 and first[2] <= 4 and first[5] == 1:
        return "tls"
    if _HTTP_REQUEST.match(first):
        return "http"
    if first.startswith((b"SSH-2.0-", b"SSH-1.99-")):  # an SSH client need not wait for the server's banner
        return "ssh"
    speaks = [kind for kind, command in _FIRST_COMMANDS if command.match(first)]
    if not speaks:
        return _c2(first)
    by_port = server_first(port)
    return by_port if by_port in speaks else speaks[0]


# What a client of a server-first protocol may send before the greeting, in
# order of preference when the port does not settle it.
_FIRST_COMMANDS = (
    ("smtp", re.compile(rb"(?i)(EHLO|HELO|LHLO) \S")),
    ("ftp", re.compile(rb"(?i)(USER \S|AUTH (TLS|SSL)\b|FEAT\r?\n|SYST\r?\n|OPTS \S)")),
    ("pop3", re.compile(rb"(?i)(USER \S|CAPA\r?\n|STLS\r?\n|APOP \S|AUTH\b)")),
    ("imap", re.compile(rb"(?i)[!#-'*-Z^-z|~]{1,20} (CAPABILITY|LOGIN|AUTHENTICATE|STARTTLS|ID|NOOP)\b")),
)


def _c2(first: bytes) -> str:
    """A C2 transport's first bytes: the HTTP/2 preface, or a SOCKS proxy's greeting."""
    if first.startswith(b"PRI * HTTP/2.0\r\n"):
        return "h2c"
    # SOCKS5: version, the number of auth methods, exactly that many of them.
    if len(first) >= 3 and first[0] == 5 and 1 <= first[1] == len(first) - 2:
        return "socks5"
    # SOCKS4(a) CONNECT: command 1, port, IPv4 address, user id up to a NUL (4a: then the host name).
    if len(first) >= 9 and first[:2] == b"\x04\x01" and first.endswith(b"\0"):
        return "socks4"
    return "other"


def wants_more(first: bytes) -> bool:
    """True while the bytes so far could still become a TLS record header or a request line."""
    if len(first) >= PEEK_BYTES:
        return False
    if first[:1] == b"\x16":
        return len(first) < 6
    if first[:1] in (b"\x04", b"\x05"):  # a SOCKS greeting: its whole header
        return len(first) < 2 or (first[0] == 5 and len(first) < 2 + first[1]) or (
            first[0] == 4 and first[1] == 1 and (len(first) < 9 or not first.endswith(b"\0")))
    line = first.split(b"\n", 1)
    return len(line) == 1 and bool(_HTTP_METHOD.match(first) or re.fullmatch(rb"[A-Z]{1,10}", first))


SERVER_FIRST = {21: "ftp", 22: "ssh", 25: "smtp", 110: "pop3", 143: "imap", 465: "smtp", 587: "smtp",
                2525: "smtp", 990: "ftp", 993: "imap", 995: "pop3"}
# Implicit TLS: the client's ClientHello comes first, the protocol inside speaks first.
IMPLICIT_TLS = frozenset((465, 990, 993, 995))


def choose(first: bytes, original_port: int | None, inside_tls: bool = False) -> str:
    """The answer for a client that said `first` (maybe nothing) to the port it asked for.

    On a port whose protocol speaks first, bytes that are none of its
    clients' first commands (a scanner's probe, an HTTP request) still get
    that protocol, as a real server there would answer: only TLS, SSH and
    another server-first protocol's own command change it.
    """
    own = server_first(original_port) if inside_tls or greets(original_port) else None
    kind = classify(first, original_port) if first else "other"
    return own if own is not None and kind in ("http", "other") else kind


def greets(original_port: int | None) -> bool:
    """True on a port whose protocol speaks first in the clear: a silent client gets the greeting soon."""
    return original_port in SERVER_FIRST and original_port not in IMPLICIT_TLS


def server_first(original_port: int | None) -> str | None:
    """The protocol that speaks first on this port; None: the echo."""
    return SERVER_FIRST.get(original_port)


def client_hello(record: bytes) -> dict:
    """SNI, offered ALPN and versions from a ClientHello's first record; {} if it is cut short.

    Parsed by hand because a failed handshake must still be logged, and
    Python's ssl shows none of what the client offered.
    """
    try:
        return _client_hello(record)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError):
        return {}


def _client_hello(rec: bytes) -> dict:
    length = struct.unpack_from("!H", rec, 3)[0]
    body = rec[5:5 + length]
    if body[0] != 1:
        return {}
    pos = 4
    legacy = struct.unpack_from("!H", body, pos)[0]
    pos += 2 + 32
    pos += 1 + body[pos]  # session id
    pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
    pos += 1 + body[pos]  # compression methods
    info: dict = {"client_version": _TLS_VERSIONS.get(legacy, hex(legacy))}
    if pos + 2 > len(body):
        return info
    end = min(len(body), pos + 2 + struct.unpack_from("!H", body, pos)[0])
    pos += 2
    while pos + 4 <= end:
        kind, size = struct.unpack_from("!HH", body, pos)
        data = body[pos + 4:pos + 4 + size]
        pos += 4 + size
        if kind == 0:  # server_name: a list of (type, name); host_name is type 0
            p = 2
            while p + 3 <= len(data):
                name_len = struct.unpack_from("!H", data, p + 1)[0]
                if data[p] == 0:
                    info["sni"] = data[p + 3:p + 3 + name_len].decode("ascii", "replace")
                p += 3 + name_len
        elif kind == 16:  # ALPN: length-prefixed protocol names
            p, offered = 2, []
            while p < len(data):
                offered.append(data[p + 1:p + 1 + data[p]].decode("ascii", "replace"))
                p += 1 + data[p]
            info["alpn_offered"] = offered
        elif kind == 43:  # supported_versions
            info["versions_offered"] = [_TLS_VERSIONS.get(v, hex(v))
                                        for v in struct.unpack_from(f"!{data[0] // 2}H", data, 1)]
    return info
