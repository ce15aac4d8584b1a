"""The protocols the default TCP answer serves once it has recognised one: a
table from the kind recognised (recognize.py) to the service answering it,
each taking one `Conversation`. Serving a new protocol is one entry here.

Each service's module is imported only once its protocol is spoken: h11, h2,
aiosmtpd and asyncssh cost a listener nothing until a client needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Awaitable, Callable

from nftdivert.config import HttpConfig, ServerFirstConfig
from nftdivert.services.tls import Upgrade


def asked_address(original: tuple[str, int] | None, sock: tuple) -> str:
    """The address the client asked for; the listener's own when nobody could say."""
    return original[0] if original is not None else sock[0].removeprefix("::ffff:")


@dataclass(frozen=True)
class Conversation:
    """A recognised conversation, as every service takes it."""

    stream: Any  # tls.Plain, the stream inside TLS, or a proxy's tunnel
    base: dict  # the fields every record of the conversation carries
    peer: tuple  # the client, as the listener's socket sees it
    sock: tuple  # the listener's own end
    original: tuple[str, int] | None  # what the client asked for, when known
    upgrade: Upgrade  # the conversation's TLS: STARTTLS is offered unless `upgrade.secure`
    scheme: str  # "https" inside TLS, else "http"
    emit: Callable[[dict], None]
    http: HttpConfig
    server_first: ServerFirstConfig
    transports: Callable[[], Any]  # -> http.Transports (a proxy's tunnels, DNS over HTTPS)

    @property
    def asked(self) -> str:
        return asked_address(self.original, self.sock)


async def _http(c: Conversation) -> None:
    from nftdivert.services import http

    await http.serve(c.stream, c.http, c.emit, c.base, c.scheme, c.transports())


async def _h2c(c: Conversation) -> None:
    from nftdivert.services import http2

    await http2.serve(c.stream, c.http, c.emit, c.base, c.scheme, c.transports())


async def _socks(kind: str, c: Conversation) -> None:
    from nftdivert.services import proxy

    await proxy.serve_socks(kind, c.stream, c.emit, c.base, c.transports())


async def _smtp(c: Conversation) -> None:
    from nftdivert.services import smtp

    await smtp.serve(c.stream, c.server_first, c.emit, c.base, c.peer, c.upgrade)


async def _pop3(c: Conversation) -> None:
    from nftdivert.services import mailbox

    await mailbox.serve_pop3(c.stream, c.server_first, c.emit, c.base, c.upgrade)


async def _imap(c: Conversation) -> None:
    from nftdivert.services import imap

    await imap.serve(c.stream, c.server_first, c.emit, c.base, c.upgrade)


async def _ftp(c: Conversation) -> None:
    from nftdivert.services import ftp

    await ftp.serve(c.stream, c.server_first, c.emit, c.base, c.peer, c.asked, c.upgrade)


async def _ssh(c: Conversation) -> None:
    from nftdivert.services import ssh

    await ssh.serve(c.stream, c.server_first, c.emit, c.base, c.peer, c.sock)


# Every kind recognize.choose can return but "tls" (unwrapped, then recognised
# again) and "other" (the echo).
ANSWERS: dict[str, Callable[[Conversation], Awaitable[None]]] = {
    "http": _http,
    "h2c": _h2c,
    "socks4": partial(_socks, "socks4"),
    "socks5": partial(_socks, "socks5"),
    "smtp": _smtp,
    "pop3": _pop3,
    "imap": _imap,
    "ftp": _ftp,
    "ssh": _ssh,
}
