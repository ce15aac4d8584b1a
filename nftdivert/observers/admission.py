"""What admission control dropped: every attempt reaches the log, rate-bounded.

A new conversation beyond its client's share is dropped in divert_unbound
(templates/ruleset.nft.j2) before conntrack confirms it, so conntrack never
reports it. The drop rule first hands the packet to an nflog group of its
own. NAT has changed its destination address by then, so the rule first
writes back the one the client asked for (`ip daddr set ct original ip
daddr`; the redirect kept the port): the packet then says all of it, on
every kernel (nflog's own conntrack attributes need a kernel option,
NETFILTER_NETLINK_GLUE_CT, that not every kernel has). Deciding before NAT
instead would need the bound-port checks before NAT too. Only the headers
are copied.

A flood must not flood the log: one `admission` record per client address
and protocol a second at most, with the number of attempts dropped, how many
destinations they asked for, and the first SHOWN of those.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from nftdivert.netlink import nflog
from nftdivert.observers.convrecords import PROTOCOL_NAMES, SCHEMA, address, endpoint, iso
from nftdivert.worker.packet import Unfit, parse_head

WINDOW = 1.0  # seconds: at most one record per client and protocol in this
SHOWN = 1024  # destinations listed per record (about 25 KiB at most); the rest are counted
DISTINCT_MAX = 65536  # destinations counted per record and window (a flood's memory stays bounded)
CLIENTS_MAX = 4096  # clients per window; beyond, their drops are only counted (`unrecorded`)
HEADERS = 128  # bytes copied of each packet: IP header, options or extension headers, the ports
TURN = 64  # receives (batches of up to nflog.QUEUE_THRESHOLD packets) between looks at the clock


@dataclass
class _Window:
    start: float
    dropped: int = 0
    destinations: dict[str, None] = field(default_factory=dict)  # an ordered set


@dataclass
class Tally:
    """Dropped attempts per (protocol, client address), one window each (pure: no socket, no clock)."""

    windows: dict[tuple[str, str], _Window] = field(default_factory=dict)
    unrecorded: int = 0

    def add(self, when: float, protocol: str, client: str, destination: str) -> None:
        key = (protocol, client)
        window = self.windows.get(key)
        if window is None:
            if len(self.windows) >= CLIENTS_MAX:
                self.unrecorded += 1
                return
            window = self.windows[key] = _Window(when)
        window.dropped += 1
        if len(window.destinations) < DISTINCT_MAX:
            window.destinations[destination] = None

    def due(self, now: float) -> list[tuple[dict, float]]:
        """(record, time) of each window that has ended by `now`; those windows are gone."""
        ended = [key for key, window in self.windows.items() if window.start + WINDOW <= now]
        return [self._record(key, self.windows.pop(key)) for key in ended]

    def rest(self) -> list[tuple[dict, float]]:
        return self.due(float("inf"))

    def next_due(self) -> float | None:
        return min((w.start + WINDOW for w in self.windows.values()), default=None)

    @staticmethod
    def _record(key: tuple[str, str], window: _Window) -> tuple[dict, float]:
        protocol, client = key
        shown = list(window.destinations)[:SHOWN]
        return {"v": SCHEMA, "time": iso(window.start), "event": "admission", "protocol": protocol,
                "client_address": client, "dropped": window.dropped, "destinations": len(window.destinations),
                "original_destinations": shown}, window.start


def parse_drop(packet: bytes) -> tuple[str, str, str] | None:
    """(protocol, client address, destination asked for) of one dropped packet's headers."""
    seg = parse_head(packet)
    if isinstance(seg, Unfit):
        return None
    return PROTOCOL_NAMES[seg.protocol], address(seg.src), endpoint(seg.dst, seg.dport)


class AdmissionLog:
    """Reads the admission group in a thread of its own; `emit(record, time)` gets each record."""

    def __init__(self, group: int, emit: Callable[[dict, float], None]) -> None:
        self._sock = nflog.open_group(group, HEADERS)
        self._emit = emit
        self.tally = Tally()
        self.lost = 0  # times the kernel dropped messages for us (ENOBUFS)
        self.failed = 0  # messages that would not parse
        self._buffer = bytearray(nflog.MESSAGE_MAX)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nftdivert-admission", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            due = self.tally.next_due()
            wait = None if due is None else max(0.0, due - time.time())
            readable, _, _ = select.select([self._sock, self._wake_r], [], [], wait)
            if self._sock in readable:
                self._read()
            self._flush(self.tally.due(time.time()))

    def _read(self) -> None:
        for _ in range(TURN):  # then the windows due are written, whatever still comes
            try:
                size = self._sock.recv_into(self._buffer, flags=socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if nflog.is_overrun(exc):
                    self.lost += 1
                    continue
                raise
            now = time.time()
            for packet in nflog.batch(self._buffer, size):
                drop = parse_drop(bytes(packet.data))
                if drop is None:
                    self.failed += 1
                    continue
                self.tally.add(packet.time or now, *drop)

    def _flush(self, records: list[tuple[dict, float]]) -> None:
        for rec, when in records:
            self._emit(rec, when)

    def close(self) -> None:
        """Read what is left and write every window, ended or not."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        try:
            self._read()
        except OSError:
            pass
        self._flush(self.tally.rest())
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
