"""The conversation observer: conntrack events in, start and end records out.

It watches from the edge: a thread of its own (in a process of its own,
observer_process.py) reads conntrack's NEW and DESTROY events, so no packet
ever waits for it. Only entries with the ruleset's ct mark bit are
nftdivert's (every conversation its redirect answers); all others are
skipped unread. On close it reads what is left,
and ends every conversation still tracked with an `open` (or `closed`,
`reset`) end record from a dump, so each start has its end.
"""
from __future__ import annotations

import os
import select
import threading
import time
from typing import Callable

from nftdivert.observers import convrecords, ctevents, links
from nftdivert.observers.ctevents import CtEvent, EventSocket

SUBNETS_FRESH = 2.0  # seconds: addresses come and go (DHCP, a new veth) while it runs


class Observer:
    """`emit(record, when)` gets each record and its time as a number.

    context: `listener_for(event) -> (name, port)`, and `owners`
    (procowner.ProcessOwners) in local and sandbox mode. The DNS name is
    added by whoever knows the names (observer_process.py).
    """

    def __init__(self, mark: int, emit: Callable[[dict, float], None], listener_for, owners=None) -> None:
        self.mark = mark
        self._emit = emit
        self._listener_for = listener_for
        self._owners = owners
        self.failed = 0  # events that raised while turned into records
        self.unended = 0  # started, then gone from conntrack without a DESTROY we read
        self._open: dict[int, tuple[dict, float]] = {}  # conntrack id -> (start record, start time)
        self._subnets: list = []
        self._subnets_at = 0.0
        self._events = EventSocket()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nftdivert-observer", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> int:
        """Times the kernel dropped events for us (ENOBUFS)."""
        return self._events.lost

    def _run(self) -> None:
        while not self._stopping:
            readable, _, _ = select.select([self._events, self._wake_r], [], [])
            if self._events in readable:
                self._drain()

    def _drain(self) -> None:
        while batch := self._events.read():
            for kind, payload in batch:
                self._handle(kind, payload)

    def _handle(self, kind: str, payload) -> None:
        try:
            ev = ctevents.parse_event(kind, payload)
            if not ev.mark & self.mark:
                return
            if kind == "new":
                self._start(ev, time.time())
            else:
                self._end(ev)
        except Exception:  # noqa: BLE001 - one odd event must not end the log
            self.failed += 1

    def _interface(self, client: bytes) -> str:
        now = time.monotonic()
        if now - self._subnets_at > SUBNETS_FRESH:
            self._subnets, self._subnets_at = links.subnets(), now
        return links.interface_for(client, self._subnets)

    def _start(self, ev: CtEvent, received: float) -> None:
        process = None
        if self._owners is not None:  # first: the process may be about to close its socket
            process = self._owners.find(ev.protocol, ev.src, ev.src_port, ev.dst, ev.dst_port)
        when = convrecords.start_time(ev, received)
        rec = convrecords.start_record(ev, when, self._listener_for(ev), self._interface(ev.src), process=process)
        self._open[ev.id] = (rec, when)
        self._emit(rec, when)

    def _end(self, ev: CtEvent) -> None:
        start, started = self._open.pop(ev.id, (None, None))
        now = time.time()
        self._emit(convrecords.end_record(ev, now, start, started), now)

    def close(self) -> None:
        """Stop the thread; read what is left; end what conntrack still tracks."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        try:
            self._drain()
            live = ctevents.dump_marked(self.mark)
        except OSError:
            live = []
        for ev in live:
            if ev.id in self._open:
                self._end(ev)
        self.unended = len(self._open)  # tracked no more, but the DESTROY never came
        self._open.clear()
        self._events.close()
        if self._owners is not None:
            self._owners.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


_PROTOCOLS = {"tcp": ctevents.TCP, "udp": ctevents.UDP}


def listener_lookup(config, is_bound) -> Callable[[CtEvent], tuple[str, int | None]]:
    """The listener that answered an entry, by the config's listeners (convrecords.listener_for)."""
    ours = {(_PROTOCOLS[lst.protocol], lst.port): lst.name for lst in config.listeners}
    defaults = {_PROTOCOLS[p]: (lst.name, lst.port) for p in ("tcp", "udp") if (lst := config.default_listener(p))}
    return lambda ev: convrecords.listener_for(ev, ours, defaults, is_bound)


def for_config(config, emit: Callable[[dict, float], None], is_bound, clients_netns: str | None = None) -> Observer:
    """The observer `run` starts: listeners from the config; processes named in
    local mode (this namespace) and in the sandbox (the clients' namespace)."""
    from nftdivert.observers.procowner import ProcessOwners

    owners = None
    if clients_netns is not None or config.mode in ("local", "both"):
        owners = ProcessOwners(clients_netns)
    try:
        return Observer(config.worker.ct_mark, emit, listener_lookup(config, is_bound), owners)
    except BaseException:
        if owners is not None:
            owners.close()
        raise
