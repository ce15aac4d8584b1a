"""A listener of one protocol's kind on a loopback port, with a CA, and a client context that trusts it."""

from __future__ import annotations

import contextlib
import socket
import ssl

from nftdivert.config import Listener, ServerFirstConfig, TlsConfig
from nftdivert.services.listeners import Listeners


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def listening(tmp_path, kind: str, **server_first):
    """(port, records, client TLS context) while a `kind` listener runs."""
    port, records = free_port(), []
    config = ServerFirstConfig(mail_dir=str(tmp_path / "mail"), uploads_dir=str(tmp_path / "uploads"), **server_first)
    lst = Listeners((Listener(kind, "tcp", port, kind=kind),), tls=TlsConfig(state_dir=str(tmp_path / "state")),
                    server_first=config, on_event=records.append)
    lst.start()
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the CA is made on the first handshake
        yield port, records, ctx
    finally:
        lst.stop()


def events(records: list[dict], event: str) -> list[dict]:
    return [r for r in records if r.get("event") == event]
