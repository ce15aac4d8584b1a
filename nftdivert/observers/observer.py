"""The conversation observer: conntrack events in, start and end records out.

It watches from the edge: a thread of its own (in a process of its own,
observer_process.py) reads conntrack's NEW and DESTROY events, so no packet
ever waits for it. Only entries with the ruleset's ct mark bit are
nftdivert's (every conversation its redirect answers); all others are
skipped unread.

A run logs only the conversations that began while it ran: the DESTROY of
an entry an earlier run left (TIME_WAIT, an unanswered datagram) is counted,
not logged. One that began during the run but whose NEW event the kernel
dropped gets its start late, from its end (conntrack's start stamp says
when it began). On close it dumps conntrack until the dump reaps no more
expired entries, ends each conversation still tracked (`open`, `closed`,
`reset`), and synthesizes an `unknown` end for any it started that
conntrack forgot without a DESTROY it read: each start has exactly one end.
"""
from __future__ import annotations

import os
import select
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from nftdivert.netlink import ctnetlink
from nftdivert.netlink.ctnetlink import Conntrack, CtEvent, EventSocket
from nftdivert.netlink.ipproto import TCP, UDP
from nftdivert.observers import convrecords, links

SUBNETS_FRESH = 2.0  # seconds: addresses come and go (DHCP, a new veth) while it runs
# A dump reaps a few expired entries per batch it sends; another one reaps
# more. Enough rounds for thousands, each only if the last reaped one of
# ours, and none begun after DUMP_SECONDS (a dump of 65,000 entries takes
# seconds, and the run waits for the stop).
DUMP_ROUNDS = 8
DUMP_SECONDS = 4.0


@dataclass
class EndCounts:
    """What the observer did about conversations whose records conntrack did not give it plainly."""

    earlier: int = 0  # ends of conversations that began before this run: not logged
    recovered: int = 0  # starts written from the end or the dump at stop: the NEW event was lost
    event_lost: int = 0  # ends synthesized: conntrack forgot it, the DESTROY event was lost
    dump_failed: int = 0  # ends synthesized: the dump at stop failed, its state is unknown
    unreadable: int = 0  # entries the dump at stop could not parse (skipped)


class Observer:
    """`emit(record, when)` gets each record and its time as a number;
    `flush()` is called whenever the events waiting have all been read.

    context: `listener_for(event, start time) -> (name, port)`, and `owners`
    (procowner.ProcessOwners) in local and sandbox mode. The DNS name is
    added by whoever knows the names (observer_process.py).
    """

    def __init__(self, mark: int, emit: Callable[[dict, float], None], listener_for, owners=None,
                 flush: Callable[[], None] = lambda: None) -> None:
        self.mark = mark
        self._emit, self._flush = emit, flush
        self._listener_for = listener_for
        self._owners = owners
        self.failed = 0  # events that raised while turned into records
        self.ends = EndCounts()
        # Conntrack stamps an entry's start in wall-clock ns: one stamped before
        # this is not this run's conversation.
        self._since_ns = time.time_ns()
        self._open: dict[tuple, tuple[dict, float]] = {}  # conversation (_key) -> (start record, start time)
        self._ended_at_close: set[tuple] | None = None  # ended while close() dumps
        self._subnets: list = []
        self._subnets_at = 0.0
        self._events = EventSocket()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nftdivert-observer", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> int:
        """Events the kernel dropped for us (our receive queue was full)."""
        return self._events.lost

    def counts(self) -> dict:
        return {"events_lost": self.lost, "failed": self.failed, **asdict(self.ends)}

    def _run(self) -> None:
        while not self._stopping:
            readable, _, _ = select.select([self._events, self._wake_r], [], [])
            if self._events in readable:
                self._drain(thread=True)

    def _drain(self, starts: bool = True, thread: bool = False) -> None:
        # The thread leaves a backlog to close() once stopping: one reader,
        # so a conversation's NEW is always handled before its DESTROY.
        while not (thread and self._stopping) and (batch := self._events.read()):
            for kind, payload in batch:
                if starts or kind == "destroy":
                    self._handle(kind, payload)
        self._flush()

    def _handle(self, kind: str, payload) -> None:
        try:
            ev = ctnetlink.parse_event(kind, payload, self.mark)
            if ev is None:
                return  # not ours
            if kind == "new":
                self._start(ev, time.time())
            else:
                self._end(ev)
        except Exception:  # noqa: BLE001 - one odd event must not end the log
            self.failed += 1

    def _began_here(self, ev: CtEvent) -> bool:
        """Conntrack stamped its start after this observer began (0: no stamp, so unknown)."""
        return ev.start_ns >= self._since_ns

    def _interface(self, client: bytes) -> str:
        now = time.monotonic()
        if now - self._subnets_at > SUBNETS_FRESH:
            self._subnets, self._subnets_at = links.subnets(), now
        return links.interface_for(client, self._subnets)

    def _start(self, ev: CtEvent, received: float, late: bool = False) -> tuple[dict, float]:
        process = None
        if self._owners is not None and not late:  # first: the process may be about to close its socket
            process = self._owners.find(ev.protocol, ev.src, ev.src_port, ev.dst, ev.dst_port)
        when = convrecords.start_time(ev, received)
        rec = convrecords.start_record(ev, when, self._listener_for(ev, when), self._interface(ev.src),
                                       process=process)
        self._open[_key(ev)] = (rec, when)
        self._emit(rec, when)
        return rec, when

    def _end(self, ev: CtEvent) -> None:
        if self._ended_at_close is not None:
            self._ended_at_close.add(_key(ev))
        start = self._open.pop(_key(ev), None)
        if start is None:
            if not self._began_here(ev):
                self.ends.earlier += 1  # an earlier run's: not this log's to end
                return
            self.ends.recovered += 1  # its NEW event was lost: the start, late
            start = self._start(ev, time.time(), late=True)
            del self._open[_key(ev)]
        now = time.time()
        self._emit(convrecords.end_record(ev, now, *start), now)

    def close(self) -> None:
        """Stop the thread; read what is left; end every conversation this run started."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        try:
            self._drain()
            self._end_live()
            self.ends.event_lost += len(self._open)  # forgotten without a DESTROY we read
        except OSError:
            self.ends.dump_failed += len(self._open)  # still tracked or not: nobody can say
        now = time.time()
        for start, _started in self._open.values():
            self._emit(convrecords.synthesized_end(start, now), now)
        self._flush()
        self._open.clear()
        self._events.close()
        if self._owners is not None:
            self._owners.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _end_live(self) -> None:
        """End what conntrack still tracks, after the dumps have reaped what expired.

        Dumping makes the kernel destroy expired entries it meets (a few per
        batch), so a conversation that timed out but was not yet reaped gets
        its real end from the DESTROY event read after each dump. NEW events
        read then are left alone: the dump's own entries start late instead.
        """
        live: dict[tuple, CtEvent] = {}
        ended = self._ended_at_close = set()  # a live entry may yet expire before the drain
        until = time.monotonic() + DUMP_SECONDS
        for _ in range(DUMP_ROUNDS):
            dump = ctnetlink.dump_marked(self.mark)
            self.ends.unreadable = max(self.ends.unreadable, dump.unreadable)
            live = {_key(ev): ev for ev in dump.live}
            waiting = len(self._open)
            self._drain(starts=False)
            if len(self._open) == waiting or all(key in live for key in self._open) or time.monotonic() > until:
                break
        for key, ev in live.items():
            if key in self._open or (key not in ended and self._began_here(ev)):
                self._end(ev)


def _key(ev: CtEvent) -> tuple:
    """A conversation: conntrack's id is a 32-bit hash, and a flood of 100,000
    entries holds a pair that share one; with the original tuple, none do."""
    return ev.id, ev.protocol, ev.src, ev.src_port, ev.dst, ev.dst_port


_PROTOCOLS = {"tcp": TCP, "udp": UDP}


def listener_lookup(config, is_bound) -> Callable[[CtEvent, float], tuple[str, int | None]]:
    """The listener that answered an entry (convrecords.listener_for): the kernel's own
    answer first (the queued mark, the reply tuple's port), the config's listeners by name.
    `is_bound(protocol, address, port, since=start time)`."""
    ours = {(_PROTOCOLS[lst.protocol], lst.port): lst.name for lst in config.listeners}
    defaults = {_PROTOCOLS[p]: (lst.name, lst.port) for p in ("tcp", "udp") if (lst := config.default_listener(p))}
    # Local mode on the queue path: one lookup per new conversation (its socket lives as long as the process).
    lookups = Conntrack() if config.divert_path == "queue" and config.mode in ("local", "both") else None

    def listener_for(ev: CtEvent, when: float) -> tuple[str, int | None]:
        sent = convrecords.diverted(ev, config.queue.ct_mark, config.divert_path == "kernel")
        if sent is None and lookups is not None:
            sent = _queued_now(lookups, ev, config.queue.ct_mark)
        return convrecords.listener_for(ev, ours, defaults, lambda *key: is_bound(*key, since=when), sent)

    return listener_for


def for_config(config, emit: Callable[[dict, float], None], is_bound, clients_netns: str | None = None,
               flush: Callable[[], None] = lambda: None) -> Observer:
    """The observer `run` starts: listeners from the config; processes named in
    local mode (this namespace) and in the sandbox (the clients' namespace)."""
    from nftdivert.observers.procowner import ProcessOwners

    owners = None
    if clients_netns is not None or config.mode in ("local", "both"):
        owners = ProcessOwners(clients_netns)
    try:
        return Observer(config.worker.ct_mark, emit, listener_lookup(config, is_bound), owners, flush)
    except BaseException:
        if owners is not None:
            owners.close()
        raise


def _queued_now(lookups: Conntrack, ev: CtEvent, queued_mark: int) -> bool | None:
    """Local mode, queue path: what divert_unbound decided, as the entry says by now.

    Its NEW event came before divert_unbound saw the packet. But the kernel
    brings a packet back in through lo in the sender's own softirq, so by
    the time the event is read the decision is almost always made: the mark
    is there if it was queued, and an entry that has seen a reply without it
    was not. Otherwise (not yet, or gone) None: the caller asks sock_diag.
    """
    if ev.protocol not in (TCP, UDP):
        return None  # only these are queued (ICMP echo is the kernel's own answer)
    try:
        entry = lookups.entry(ev.version, ev.protocol, ev.src, ev.src_port, ev.reply_src, ev.reply_src_port)
    except OSError:
        return None
    if entry is None:
        return None
    if entry.mark & queued_mark:
        return True
    return False if entry.seen_reply else None
