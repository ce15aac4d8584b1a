"""SMTP: aiosmtpd accepts every mail; each is kept in `[server_first] mail_dir` and logged.

The log record (event "smtp") holds the envelope (HELO, MAIL FROM, RCPT TO),
the message's headers, its size and sha256; an AUTH gets a record of its
own ("smtp_auth") with the login and password offered, and succeeds.
"""

from __future__ import annotations

import ssl

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax

from nftdivert.config import ServerFirstConfig
from nftdivert.services import adapter
from nftdivert.services.mailstore import MAX_VALUE, headers, keep



def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Handler:
    def __init__(self, config: ServerFirstConfig, emit, base: dict) -> None:
        self._config, self._emit, self._base = config, emit, base

    async def handle_DATA(self, _server, session, envelope) -> str:
        data = envelope.original_content or b""
        self._emit(dict(self._base, event="smtp", helo=session.host_name, mail_from=envelope.mail_from,
                        rcpt_to=list(envelope.rcpt_tos), headers=headers(data),
                        **keep(self._config.mail_dir, data, ".eml")))
        return "250 2.0.0 Ok: queued"

    def authenticate(self, _server, _session, _envelope, mechanism: str, auth_data) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            creds = {"user": _text(auth_data.login), "password": _text(auth_data.password)}
        else:
            creds = {"data": _text(auth_data)[:MAX_VALUE]}
        self._emit(dict(self._base, event="smtp_auth", mechanism=mechanism, **creds))
        return AuthResult(success=True)


class _Upgraded:
    """What aiosmtpd's own TLS layer would be, as far as its EHLO and AUTH ask: there."""


class _Smtp(SMTP):
    """aiosmtpd with STARTTLS done by the listener's stream (adapter.serve), not asyncio's transport."""

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if self._tls_protocol is not None or not self.tls_context:  # spoken already (or implicit TLS)
            await self.push("454 4.7.0 TLS not available")
            return
        wanted = self.transport.tls_wanted = self.loop.create_future()
        await self.push("220 2.0.0 Ready to start TLS")
        if not await wanted:
            self.transport.close()
            return
        # RFC 3207 4.2: forget what was said in the clear.
        self._tls_protocol = _Upgraded()
        self.session = self._create_session()
        self.session.peer = self.transport.get_extra_info("peername")
        self.envelope = self._create_envelope()


async def serve(stream, config: ServerFirstConfig, emit, base: dict, peer, upgrade=None) -> None:
    """`upgrade`: the conversation's TLS (default_tcp.Upgrade); STARTTLS is offered unless it is spoken already."""
    handler = _Handler(config, emit, base)
    # ident: the greeting says "ESMTP" like a mail server, not aiosmtpd's own name.
    # tls_context only makes aiosmtpd offer STARTTLS; the listener's stream does the handshake.
    protocol = _Smtp(handler, hostname=config.hostname, ident="ESMTP Postfix", authenticator=handler.authenticate,
                     auth_require_tls=False, timeout=60, tls_context=_OFFER if upgrade is not None and not upgrade.secure else None)
    await adapter.serve(protocol, stream, {"peername": peer}, upgrade)


class _Offer:
    """Truthy, and what aiosmtpd checks a context for when it is given one."""

    verify_mode = ssl.CERT_NONE
    check_hostname = False


_OFFER = _Offer()
