"""The observer in a process of its own, so it never takes the worker's CPU.

In the worker's interpreter, every event the observer parsed was time the
worker could not run (one interpreter lock): under a flood the worker fell
behind. The child reads conntrack's events and builds the records; the
parent only adds the DNS name (its listener process knows the names), counts
the record for the summary and hands it to the log. The child dies with the
parent (PR_SET_PDEATHSIG); on SIGTERM it ends what conntrack still tracks
and exits, and the parent reads to the end of the pipe.
"""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import signal
import threading
import time
from collections import OrderedDict
from typing import Callable

from nftdivert.config import Config
from nftdivert.process.child import READY, spawn, wait_ready
from nftdivert.observers import convrecords
from nftdivert.observers.admission import AdmissionLog, Tally
from nftdivert.observers.summary import BY_TASK, GROUP_BY, Summary
from nftdivert.ruleset import bound_sets

_STATS_SECONDS = 1.0
START_SECONDS = 15.0
# Records per message to the parent at most: one pickle and one write for
# many, and the first of a burst still goes out as soon as its batch is read.
RECORD_BATCH = 256
BOUND_FRESH = 0.5  # seconds
NICE = 19
# Names of open conversations, until their end records: a bound, for a flood
# that never ends (its DESTROY events lost); the oldest end without its name.
OPEN_KEPT = 65536  # open conversations remembered here (their names, what to end)


class ObserverProcess:
    """Parent side: `emit(record)` gets each record, with its name; counters as the child last said."""

    _task_for = None  # no analyses: no record carries a task
    _profile_for = None  # no [[profiles]]: no record carries a profile
    _named = None  # the DNS listener's addresses as the config says them (no reload changes them)

    def __init__(self, config: Config, emit: Callable[[dict], None], name_for=None,
                 clients_netns: str | None = None, task_for=None, profile_for=None, named=None) -> None:
        """`task_for(client address, start time)`: the analysis a conversation belongs to, or None;
        `profile_for(client address, start time)`: the profile that answers that client then (by its
        address: as the profiles are now, a reload changes them; or its task's choice then), or None.
        `named()`: the networks whose addresses stand for names now (every profile's fixed answers too)."""
        self._config, self._emit, self._name_for, self._task_for = config, emit, name_for, task_for
        self._profile_for = profile_for
        self._named = named
        self._pools = config.dns.named()  # the addresses the DNS listener gives names
        self.summary = Summary(BY_TASK if task_for is not None else GROUP_BY)
        self._counts: dict = {}  # the child's, as it last said
        self._failed_here = 0  # records the parent could not finish
        # A conversation (convrecords.conversation_key) -> (its start record as written, its time), until its
        # end record: its name for the end, and what a child that dies leaves for close() to end.
        # Bounded: past OPEN_KEPT the oldest is forgotten here (the child still ends it).
        self._open: OrderedDict[tuple, tuple[dict, float]] = OrderedDict()
        self._since = time.time()  # conversations that started before are another run's
        self._closed = False
        self._process, self._conn = spawn("nftdivert-observer", _serve, config, clients_netns)
        try:
            wait_ready("the observer", self._conn, self._process.pid, START_SECONDS)
        except OSError:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read, name="nftdivert-observer-records", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, *rest = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "records":
                for when, rec in rest[0]:
                    try:
                        self._record(when, rec)
                    except Exception:  # noqa: BLE001 - one odd record must not end the log
                        self._failed_here += 1
            elif kind == "stats":
                self._counts = rest[0]

    @property
    def process(self) -> multiprocessing.process.BaseProcess:
        """The child; its sentinel tells its end at once."""
        return self._process

    @property
    def lost(self) -> int:
        """Conntrack events the kernel dropped for the observer."""
        return self._counts.get("events_lost", 0)

    @property
    def failed(self) -> int:
        return self._counts.get("failed", 0) + self._failed_here

    def ends(self) -> dict:
        """How the log's ends came about where conntrack did not say plainly; `unended` once closed."""
        c = self._counts
        ends = {"earlier": c.get("earlier", 0), "recovered": c.get("recovered", 0),
                "synthesized": {"event_lost": c.get("event_lost", 0), "dump_failed": c.get("dump_failed", 0)},
                "unreadable": c.get("unreadable", 0)}
        if self._closed:  # a start the log got without its end (the observer died, a record failed)
            ends["unended"] = len(self._open)
        return ends

    def _record(self, when: float, rec: dict) -> None:
        if rec["event"] not in ("start", "end"):  # admission: no conversation, no name
            rec = convrecords.with_task(convrecords.with_profile(rec, self._profile(rec, when)), self._task(rec, when))
            self.summary.add(rec)
            self._emit(rec)
            return
        if rec["event"] == "start":
            name, task, profile = self._name(rec, when), self._task(rec, when), self._profile(rec, when)
        else:  # an end has its start's name, task and profile, as of the start
            start = self._open.pop(convrecords.conversation_key(rec), None)
            began = when - (rec.get("duration") or 0)
            name, task, profile = ((start[0].get("name"), start[0].get("task"), start[0].get("profile")) if start
                                   else (None, self._task(rec, began), self._profile(rec, began)))
        if name:
            rec = convrecords.named(rec, name)
        rec = convrecords.with_task(convrecords.with_profile(rec, profile), task)
        if rec["event"] == "start":
            self._open[convrecords.conversation_key(rec)] = (rec, when)
            if len(self._open) > OPEN_KEPT:
                self._open.popitem(last=False)
        self.summary.add(rec)
        self._emit(rec)

    def _task(self, rec: dict, when: float) -> str | None:
        return None if self._task_for is None else self._task_for(rec["client_address"], when)

    def _profile(self, rec: dict, when: float) -> str | None:
        return None if self._profile_for is None else self._profile_for(rec["client_address"], when)

    def _name(self, rec: dict, when: float) -> str | None:
        if self._name_for is None:
            return None
        address = ipaddress.ip_address(convrecords.split_endpoint(rec["original_destination"])[0])
        if not any(address in pool for pool in (self._pools if self._named is None else self._named())):
            return None  # only the DNS listener's pool addresses have names
        return self._name_for(address, when)

    def close(self, timeout: float = 20) -> None:
        """SIGTERM: the child ends what is still tracked; read its records to the end.

        `timeout` leaves room for a flood's backlog (64 MiB of events, read at
        nice 0 once stopping) and the dumps at stop; a child still busy then is
        killed, and the starts it had not ended are counted as unended.
        """
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(timeout=timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(timeout=timeout)
            if self._process.exitcode != 0:  # killed: it ended nothing, and left events unread
                self._recover()
        self._conn.close()
        self._closed = True

    def _recover(self) -> None:
        """What a dead child left undone, from a dump of what conntrack still tracks: the
        starts it never sent (of this run's conversations), and the ends of all it started.
        What is left in _open then is unended (ends())."""
        from nftdivert.netlink import ctnetlink
        from nftdivert.observers import links, observer

        try:
            live = ctnetlink.dump_marked(self._config.worker.ct_mark).live
        except OSError:
            live = []
        ports = bound_sets.read()
        listener_for = observer.listener_lookup(self._config, lambda *key, since=0.0: ports.is_bound(*key))
        subnets, now = links.subnets(), time.time()
        for ev in live:
            key = convrecords.event_key(ev)
            if key not in self._open:
                if ev.start_ns / 1e9 < self._since:
                    continue  # another run's (or without a stamp: nothing tells)
                when = convrecords.start_time(ev, now)
                self._record(when, convrecords.start_record(ev, when, listener_for(ev, when),
                                                            links.interface_for(ev.src, subnets)))
            if key in self._open:  # else forgotten past OPEN_KEPT: unended
                start, started = self._open[key]
                self._record(now, convrecords.end_record(ev, now, start, started))


def _serve(conn, config: Config, clients_netns: str | None) -> None:
    """The child: observe until SIGTERM, then end what is still tracked."""
    from nftdivert.observers import observer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # The data path first: under a flood the observer takes only CPU nobody
    # else wants; if it falls behind, the kernel drops events (counted), not packets.
    os.nice(NICE)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ports = _Bound()
    lock = threading.Lock()
    pending: list[tuple[float, dict]] = []  # records not yet sent: a flood's go in batches

    def send(message=None) -> None:
        """Send what is pending, then `message`; in order, whichever thread asks."""
        with lock:
            try:
                if pending:
                    conn.send(("records", pending[:]))
                    pending.clear()
                if message is not None:
                    conn.send(message)
            except (OSError, ValueError):
                pending.clear()
                stop.set()  # the parent is gone

    def emit(rec: dict, when: float) -> None:
        with lock:
            pending.append((when, rec))
            full = len(pending) >= RECORD_BATCH
        if full:
            send()

    record = emit  # the admission reader's records go in the same batches

    try:
        obs = observer.for_config(config, emit, ports.is_bound, clients_netns=clients_netns, flush=send)
    except OSError as exc:
        send(("error", f"cannot watch conntrack for the conversation log: {exc}"))
        return
    try:
        drops = _admission_log(config, record)
    except OSError as exc:
        obs.close()
        send(("error", f"cannot read nflog group {config.queue.admission_group} for what admission control "
                       f"drops (queue.admission_group): {exc.strerror or exc}"))
        return

    def stats() -> tuple:
        # What admission's reader could not record counts with the events the kernel could not deliver.
        return ("stats", {**obs.counts(), "events_lost": obs.lost + drops.lost + drops.tally.unrecorded,
                          "failed": obs.failed + drops.failed})

    send(READY)
    try:
        while not stop.wait(_STATS_SECONDS):
            send(stats())
    finally:
        try:  # the ruleset is gone: nobody to yield to while the backlog and the stop's dumps are read
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass
        obs.close()
        drops.close()
        send(stats())
        conn.close()


class _NoAdmission:
    lost = failed = 0
    tally = Tally()

    def close(self) -> None:
        pass


def _admission_log(config: Config, record):
    """The reader of what admission control drops, where the ruleset has it (the queue path, limits on)."""
    limits = config.queue.new_tcp_per_source or config.queue.new_udp_per_source
    if config.divert_path == "kernel" or not limits:
        return _NoAdmission()
    return AdmissionLog(config.queue.admission_group, record)


class _Bound:
    """The host's bound ports as sock_diag says, at most BOUND_FRESH seconds old when asked.

    A port a service bound a moment before the conversation began may be
    missing from a view that old: where the view says "not bound" and is
    older than the conversation (`since`, wall clock), sock_diag is asked
    again. That costs a dump only for what goes unanswered or to a default
    listener, at most one per batch of events read together.
    """

    def __init__(self) -> None:
        self._ports, self._at, self._wall = bound_sets.read(), time.monotonic(), time.time()

    def is_bound(self, protocol: int, address: bytes, port: int, since: float = 0.0) -> bool:
        if time.monotonic() - self._at > BOUND_FRESH:
            self._read()
        if self._ports.is_bound(protocol, address, port):
            return True
        if self._wall >= since:
            return False
        self._read()
        return self._ports.is_bound(protocol, address, port)

    def _read(self) -> None:
        self._ports, self._at, self._wall = bound_sets.read(), time.monotonic(), time.time()
