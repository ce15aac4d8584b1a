"""Records to a remote syslog collector ([syslog]): a thread of its own, fed through a bounded buffer.

The log's writer hands each record over with offer(), which never waits:
a collector that is slow, away or unreachable holds up nothing but this
thread. While it is away the records wait, up to `buffer` of them; one that
finds the buffer full is dropped and counted. The thread reconnects with a
backoff (RECONNECT_FIRST doubling up to RECONNECT_MOST seconds) and sends
what waited, oldest first. So offered = sent + buffered + dropped, always.

A record leaves the buffer only once the connection took it. Before each
send the connection is checked for the collector's FIN (rsyslog stopped,
restarted): a TCP send into a connection its peer has closed "succeeds",
and what it sent is lost. A collector that dies between that check and
the send loses what was in flight then; plain syslog over TCP has no
acknowledgement to tell (RELP has).
"""
from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections import deque

from nftdivert.config import SYSLOG_FACILITIES, SyslogConfig, collector_address
from nftdivert.errors import ConfigError
from nftdivert.observers.rfc5424 import Header, frame

RECONNECT_FIRST = 0.1  # seconds
RECONNECT_MOST = 2.0
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0  # a collector that takes nothing for this long: the connection is given up, records kept
BATCH_BYTES = 64 * 1024  # sent in one write at most, so one failure resends little


def tls_context(cfg: SyslogConfig) -> ssl.SSLContext | None:
    """The client's TLS context ([syslog] tls): the collector's certificate checked against ca_file
    (or the system's CAs) and its name; a client certificate if given. Bad files: exit 2, naming the key."""
    if not cfg.tls:
        return None
    key = "syslog.ca_file"
    try:
        context = ssl.create_default_context(cafile=cfg.ca_file or None)
        if cfg.cert_file:
            key = "syslog.cert_file"
            context.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        value = cfg.cert_file if key == "syslog.cert_file" else cfg.ca_file
        raise ConfigError(key, value, getattr(exc, "strerror", None) or str(exc)) from None
    return context


class SyslogSender:
    """offer(json_text, record) from the log's writer; counts() from anywhere; close() at the stop."""

    def __init__(self, cfg: SyslogConfig, context: ssl.SSLContext | None = None) -> None:
        self._host, self._port = collector_address(cfg.address)
        self._context = context
        self._header = Header(SYSLOG_FACILITIES[cfg.facility], socket.gethostname(), cfg.app_name, os.getpid())
        self._limit = cfg.buffer
        self._pending: deque[bytes] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._stop = threading.Event()  # set by close()
        self._deadline = 0.0  # when closing: give up on what still waits after this (monotonic)
        self._sock: socket.socket | None = None
        self.sent = self.dropped = self.connections = 0
        self.error = ""  # why the last connection failed, until the next one is up
        self._thread = threading.Thread(target=self._run, name="nftdivert-syslog", daemon=True)
        self._thread.start()

    def offer(self, json_text: str, rec: dict) -> None:
        data = frame(self._header.message(json_text, rec.get("time"), rec.get("event")))
        with self._cv:
            if len(self._pending) >= self._limit or self._closing:
                self.dropped += 1
                return
            self._pending.append(data)
            self._cv.notify()

    def counts(self) -> dict:
        with self._cv:
            return {"sent": self.sent, "buffered": len(self._pending), "dropped": self.dropped,
                    "connections": self.connections, "connected": int(self._sock is not None)}

    def close(self, timeout: float = 5.0) -> None:
        """Send what waits, for at most `timeout` seconds (a collector that is away gets no more
        chances); the rest is counted as dropped."""
        with self._cv:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cv.notify()
        self._stop.set()
        self._thread.join(timeout + SEND_TIMEOUT + CONNECT_TIMEOUT)

    # -- the thread
    def _run(self) -> None:
        # Connection attempts back off (RECONNECT_FIRST doubling up to RECONNECT_MOST) until one lasts:
        # a collector that refuses, or accepts and closes at once (a client certificate it will not
        # take), is not hammered.
        wait, next_try, up_since = RECONNECT_FIRST, 0.0, 0.0
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending or (self._closing and time.monotonic() > self._deadline):
                    break
                batch = self._batch()
            if self._sock is None or self._peer_closed():
                self._disconnect()
                self._stop.wait(max(0.0, next_try - time.monotonic()))  # close() cuts it short, an offer does not
                next_try, wait = time.monotonic() + wait, min(wait * 2, RECONNECT_MOST)
                if not self._connect():
                    if self._stop.is_set():
                        break  # stopping, and the collector is away: what waits is dropped
                    continue
                up_since = time.monotonic()
            try:
                self._sock.sendall(b"".join(batch))
            except OSError as exc:
                self.error = f"sending: {exc}"
                self._disconnect()
                continue
            if time.monotonic() - up_since >= RECONNECT_MOST:
                wait = RECONNECT_FIRST  # this connection lasted: the next outage starts the backoff anew
            with self._cv:
                for _ in batch:
                    self._pending.popleft()
                self.sent += len(batch)
        with self._cv:
            self.dropped += len(self._pending)  # the collector stayed away until the stop
            self._pending.clear()
        self._disconnect()

    def _batch(self) -> list[bytes]:
        """The oldest records, up to BATCH_BYTES (at least one); they stay buffered until sent."""
        batch, size = [], 0
        for data in self._pending:
            if batch and size + len(data) > BATCH_BYTES:
                break
            batch.append(data)
            size += len(data)
        return batch

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            self.error = f"connecting to {self._host}:{self._port}: {exc.strerror or exc}"
            return False
        try:
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(SEND_TIMEOUT)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            self.error = f"TLS with {self._host}:{self._port}: {exc}"
            return False
        with self._cv:
            self._sock = sock
            self.connections += 1
        self.error = ""
        return True

    def _peer_closed(self) -> bool:
        """Whether the collector has closed its end (or reset it). It never sends anything else,
        bar TLS's own messages (session tickets), which a read consumes."""
        sock = self._sock
        poll = select.poll()
        poll.register(sock, select.POLLIN | select.POLLRDHUP | select.POLLERR | select.POLLHUP)
        if not poll.poll(0):
            return False
        sock.settimeout(0)
        try:
            while True:
                if not sock.recv(4096):
                    return True  # its FIN
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            sock.settimeout(SEND_TIMEOUT)

    def _disconnect(self) -> None:
        with self._cv:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
