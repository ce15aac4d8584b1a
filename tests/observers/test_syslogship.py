"""The syslog sender against a real TCP (and TLS) collector on loopback: every record once and
in order, buffered while the collector is away, the excess dropped and counted, never waiting."""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest

from harness import wait_for
from nftdivert.config import ConfigError, SyslogConfig
from nftdivert.observers import syslogship
from nftdivert.observers.syslogship import SyslogSender


def unframe(data: bytes) -> tuple[list[bytes], bytes]:
    """RFC 6587 octet counting, the collector's side: (whole messages, the rest)."""
    out = []
    while True:
        length, space, rest = data.partition(b" ")
        if not space or not length.isdigit() or len(rest) < int(length):
            return out, data
        out.append(rest[:int(length)])
        data = rest[int(length):]


class Collector:
    """Accepts on a loopback port, reads octet-counted messages; stop() closes everything, start() again."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context, self.messages, self.port = context, [], 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> "Collector":
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen()
        self.port, self._listener = sock.getsockname()[1], sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return self

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            if self.context is not None:
                try:
                    conn = self.context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()
                    continue
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        rest = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            whole, rest = unframe(rest + data)
            with self._lock:
                self.messages += whole

    def stop(self) -> None:
        if self._listener is None:
            return
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes its accept(); a close alone would not
        self._listener.close()
        self._listener = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()

    def records(self) -> list[dict]:
        with self._lock:
            return [json.loads(m.split(b" - ", 1)[1]) for m in self.messages]


def _sender(collector: Collector, **keys) -> SyslogSender:
    return SyslogSender(SyslogConfig(address=f"127.0.0.1:{collector.port}", **keys), keys.get("context"))


def _offer(sender: SyslogSender, first: int, n: int) -> None:
    for i in range(first, first + n):
        rec = {"v": 1, "time": "2026-12-06T10:00:00.000Z", "event": "start", "id": i}
        sender.offer(json.dumps(rec), rec)


def _ids(collector: Collector) -> list[int]:
    return [r["id"] for r in collector.records()]


def test_every_record_arrives_once_in_order_with_its_header():
    collector = Collector().start()
    sender = _sender(collector, app_name="gw-a", facility="daemon")
    try:
        _offer(sender, 0, 500)
        wait_for(lambda: len(collector.messages) >= 500, 10, "500 messages at the collector")
        assert _ids(collector) == list(range(500))
        assert collector.messages[0].startswith(b"<30>1 2026-12-06T10:00:00.000Z ")  # daemon (3) * 8 + 6
        assert b" gw-a " in collector.messages[0] and b" start - {" in collector.messages[0]
        assert sender.counts() == {"sent": 500, "buffered": 0, "dropped": 0, "connections": 1, "connected": 1}
    finally:
        sender.close()
        collector.stop()


def test_while_the_collector_is_away_records_wait_within_the_buffer_and_none_is_lost():
    collector = Collector().start()
    sender = _sender(collector, buffer=50)
    try:
        _offer(sender, 0, 10)
        wait_for(lambda: len(collector.messages) == 10, 10, "the first 10")
        collector.stop()
        _offer(sender, 10, 50)  # exactly the buffer's bound
        wait_for(lambda: sender.counts()["connected"] == 0, 10, "the sender to see the collector gone")
        assert sender.counts()["buffered"] == 50 and sender.dropped == 0
        collector.start()  # the same port
        wait_for(lambda: len(collector.messages) >= 60, 15, "the buffered records after the restart")
        assert _ids(collector) == list(range(60))  # each once, in order
        assert sender.counts() == {"sent": 60, "buffered": 0, "dropped": 0, "connections": 2, "connected": 1}
    finally:
        sender.close()
        collector.stop()


def test_beyond_the_buffer_the_newest_are_dropped_and_everything_adds_up():
    collector = Collector().start()
    sender = _sender(collector, buffer=50)
    try:
        _offer(sender, 0, 1)
        wait_for(lambda: len(collector.messages) == 1, 10, "the first record")
        collector.stop()  # its FIN is there before the next send: the sender checks for it first
        started = time.monotonic()
        _offer(sender, 1, 80)
        assert time.monotonic() - started < 1.0  # offering never waits for the collector
        assert sender.counts()["dropped"] == 30 and sender.counts()["buffered"] == 50
        collector.start()
        wait_for(lambda: sender.counts()["buffered"] == 0 and len(collector.messages) >= 51, 15,
                 "the buffer to drain into the collector")
        assert _ids(collector) == list(range(51))  # the oldest kept
        counts = sender.counts()
        assert counts["sent"] + counts["dropped"] == 81 and counts["sent"] == len(collector.messages)
    finally:
        sender.close()
        collector.stop()


def test_records_still_buffered_at_the_stop_are_counted_as_dropped():
    collector = Collector().start()
    port = collector.port
    collector.stop()  # nobody listens
    sender = SyslogSender(SyslogConfig(address=f"127.0.0.1:{port}", buffer=100))
    _offer(sender, 0, 20)
    started = time.monotonic()
    sender.close(timeout=1)
    assert time.monotonic() - started < 3
    assert sender.counts() == {"sent": 0, "buffered": 0, "dropped": 20, "connections": 0, "connected": 0}
    assert "refused" in sender.error


@pytest.fixture
def ca(tmp_path):
    from nftdivert.services import certs

    return certs.ensure_ca(tmp_path / "state"), certs


def test_over_tls_the_collector_s_certificate_is_checked(ca, tmp_path):
    authority, certs = ca
    collector = Collector(certs.Contexts(authority).get(None, "127.0.0.1")).start()
    cfg = SyslogConfig(address=f"127.0.0.1:{collector.port}", tls=True, ca_file=str(authority.cert_path))
    sender = SyslogSender(cfg, syslogship.tls_context(cfg))
    try:
        _offer(sender, 0, 5)
        wait_for(lambda: len(collector.messages) >= 5, 10, "5 messages over TLS")
        assert _ids(collector) == list(range(5))
    finally:
        sender.close()
    other = tmp_path / "other.pem"  # a CA that did not sign the collector's certificate
    other.write_bytes(certs.ensure_ca(tmp_path / "other").cert.public_bytes(certs.serialization.Encoding.PEM))
    cfg = SyslogConfig(address=f"127.0.0.1:{collector.port}", tls=True, ca_file=str(other))
    stranger = SyslogSender(cfg, syslogship.tls_context(cfg))
    try:
        _offer(stranger, 5, 1)
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in stranger.error, 10, "the certificate refused")
        assert stranger.counts()["sent"] == 0 and stranger.counts()["buffered"] == 1
    finally:
        stranger.close(timeout=0.5)
        collector.stop()
    assert len(collector.messages) == 5


def test_a_ca_file_that_cannot_be_read_is_bad_input_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="syslog.ca_file"):
        syslogship.tls_context(SyslogConfig(address="127.0.0.1:6514", tls=True, ca_file=str(tmp_path / "none.pem")))


def test_a_collector_that_accepts_and_closes_at_once_is_not_hammered():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[float] = []

    def close_each() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(time.monotonic())
            conn.close()

    threading.Thread(target=close_each, daemon=True).start()
    sender = SyslogSender(SyslogConfig(address=f"127.0.0.1:{listener.getsockname()[1]}"))
    try:
        for i in range(20):  # each record finds the last connection closed: a new one, after a pause
            _offer(sender, i, 1)
            wait_for(lambda: sender.counts()["buffered"] == 0, 10, "the record to go")
            if len(accepted) >= 4:
                break
        assert len(accepted) >= 4
        # 0.1 s, then 0.2 s, then 0.4 s between attempts: the backoff holds while no connection lasts.
        assert accepted[3] - accepted[0] >= 0.7, [round(t - accepted[0], 3) for t in accepted]
    finally:
        sender.close(timeout=0.5)
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
