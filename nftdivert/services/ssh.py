"""SSH: asyncssh presents the banner, takes the key exchange, and refuses every login.

One log record per conversation (event "ssh") at its end: the client's
banner, and each user name and password offered. Refusing every password
ends the client cleanly (`ssh -o BatchMode=yes` exits at once), where an
accepted one would leave it waiting for a shell.
"""

from __future__ import annotations

import asyncio

import asyncssh

from nftdivert.config import ServerFirstConfig
from nftdivert.services import adapter

LOGIN_TIMEOUT = 30  # seconds a client may take to give up logging in
MAX_ATTEMPTS = 20

_host_key = None  # one per listener process: made on the first SSH conversation


def host_key():
    global _host_key
    if _host_key is None:
        _host_key = asyncssh.generate_private_key("ssh-ed25519")
    return _host_key


class _Server(asyncssh.SSHServer):
    def __init__(self, emit, base: dict) -> None:
        self._emit, self._base = emit, base
        self._conn = None
        self._logins: list[dict] = []

    def connection_made(self, conn) -> None:
        self._conn = conn

    def connection_lost(self, exc) -> None:
        record = dict(self._base, event="ssh", client_version=self._conn.get_extra_info("client_version") or "",
                      logins=self._logins)
        if exc is not None and not isinstance(exc, asyncssh.ConnectionLost):  # the client leaving is no error
            record["error"] = str(exc)[:200]
        self._emit(record)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return False  # a password prompt is where clients put the password

    def validate_password(self, username: str, password: str) -> bool:
        if len(self._logins) < MAX_ATTEMPTS:
            self._logins.append({"user": username, "password": password})
        return False


async def serve(stream, config: ServerFirstConfig, emit, base: dict, peer, local) -> None:
    server = _Server(emit, base)
    options = await asyncssh.SSHServerConnectionOptions.construct(
        server_host_keys=[host_key()], server_version=config.ssh_banner.removeprefix("SSH-2.0-"),
        server_factory=lambda: server, login_timeout=LOGIN_TIMEOUT)
    # No waiter: the adapter runs the conversation to its end, nobody awaits its start.
    protocol = asyncssh.SSHServerConnection(asyncio.get_running_loop(), options, wait=None)
    await adapter.serve(protocol, stream, {"peername": peer, "sockname": local})
