"""Services tests: a default TCP listener on loopback with what the C2 transports need: a CA, rules, a DNS pool."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from nftdivert.config import DnsConfig, HttpConfig, HttpRule, Listener, RecognizeConfig, TlsConfig
from nftdivert.services import certs
from nftdivert.services.dns import Resolver
from nftdivert.services.listeners import Listeners

BIG = b"x" * 300_000  # beyond HTTP/2's initial window (65,535): sent as the client takes it


@dataclass
class Served:
    port: int
    records: list
    questions: list  # (client, name, type, answer, rcode, profile) from the DNS pool
    ca: Path
    resolver: Resolver

    def of(self, event: str, count: int = 1) -> list[dict]:
        """The records of this event, once there are `count` (the listener logs on its own thread)."""
        deadline = time.monotonic() + 5
        while len(found := [r for r in self.records if r.get("event") == event]) < count:
            assert time.monotonic() < deadline, f"{count} {event} records, got {self.records}"
            time.sleep(0.01)
        return found


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


def served(tmp_path):
    """The listener, for a test module's fixture: `c2 = pytest.fixture(c2served.served, name="c2")`."""
    port = free_port()
    questions: list = []
    resolver = Resolver.from_config(DnsConfig(), on_question=lambda *q: questions.append(q))
    # The CA first: a client wants it before the first handshake would make it.
    served = Served(port, [], questions, certs.ensure_ca(tmp_path / "state").cert_path, resolver)
    rules = (HttpRule(host="tasks.example", path="/ws", body="run calc.exe"),
             HttpRule(host="*", path="/big", body=BIG.decode()),
             HttpRule(host="*", path="/kept", headers=(("TE", "gzip"), ("X-Id", "7")), body="k"))
    lst = Listeners((Listener("t", "tcp", port),), tls=TlsConfig(state_dir=str(tmp_path / "state")),
                    http=HttpConfig(bodies_dir="", rules=rules), recognize=RecognizeConfig(wait=0.3),
                    on_event=served.records.append, resolver=resolver)
    lst.start()
    try:
        yield served
    finally:
        lst.stop()


class Memory:
    """A stream over bytes given in advance (then the end): what the answers read and write."""

    def __init__(self, data: bytes) -> None:
        self.data, self.written = data, b""

    async def read(self, n: int = 65536) -> bytes:
        out, self.data = self.data[:n], self.data[n:]
        return out

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

