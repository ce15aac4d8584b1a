"""SMTP: aiosmtpd accepts every mail; each is kept in `[server_first] mail_dir` and logged.

The log record (event "smtp") holds the envelope (HELO, MAIL FROM, RCPT TO),
the message's headers, its size and sha256; an AUTH gets a record of its
own ("smtp_auth") with the login and password offered, and succeeds.
"""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from nftdivert.config import ServerFirstConfig
from nftdivert.services import adapter
from nftdivert.services.mailstore import keep

MAX_HEADERS = 100
MAX_VALUE = 1024


def headers(data: bytes) -> list[list[str]]:
    """The message's header fields as [name, value] pairs, bounded."""
    msg = BytesHeaderParser(policy=compat32).parsebytes(data)
    return [[name, str(value)[:MAX_VALUE]] for name, value in list(msg.items())[:MAX_HEADERS]]


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


async def serve(stream, config: ServerFirstConfig, emit, base: dict, peer) -> None:
    handler = _Handler(config, emit, base)
    # ident: the greeting says "ESMTP" like a mail server, not aiosmtpd's own name.
    protocol = SMTP(handler, hostname=config.hostname, ident="ESMTP Postfix", authenticator=handler.authenticate,
                    auth_require_tls=False, timeout=60)
    await adapter.serve(protocol, stream, {"peername": peer})
