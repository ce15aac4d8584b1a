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
from typing import Callable

from nftdivert.config import Config
from nftdivert.lab.lifeline import die_with_parent
from nftdivert.observers import bound, convrecords
from nftdivert.observers.summary import Summary

_STATS_SECONDS = 1.0
BOUND_FRESH = 0.5  # seconds
NICE = 19


class ObserverProcess:
    """Parent side: `emit(record)` gets each record, with its name; counters as the child last said."""

    def __init__(self, config: Config, emit: Callable[[dict], None], name_for=None,
                 clients_netns: str | None = None) -> None:
        self._config, self._emit, self._name_for = config, emit, name_for
        self._pools = [ipaddress.ip_network(config.dns.answer_v4), ipaddress.ip_network(config.dns.answer_v6)]
        self.summary = Summary()
        self.lost = self.unended = self._failed_child = 0
        self._failed_here = 0  # records the parent could not finish
        # Conversation id -> (its start record as written, its time), until its end record:
        # its name for the end, and what a child that dies leaves for close() to end.
        self._open: dict[int, tuple[dict, float]] = {}
        self._since = time.time()  # conversations that started before are another run's
        ctx = multiprocessing.get_context("fork")
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_serve, args=(config, child_end, os.getpid(), clients_netns),
                                    name="nftdivert-observer", daemon=True)
        self._process.start()
        child_end.close()
        first = self._conn.recv() if self._conn.poll(15) else ("error", "the observer did not come up")
        if first[0] != "ready":
            self.close()
            raise OSError(first[1])
        self._reader = threading.Thread(target=self._read, name="nftdivert-observer-records", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                kind, *rest = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "record":
                try:
                    self._record(*rest)
                except Exception:  # noqa: BLE001 - one odd record must not end the log
                    self._failed_here += 1
            elif kind == "stats":
                self.lost, self._failed_child, self.unended = rest

    @property
    def process(self) -> multiprocessing.process.BaseProcess:
        """The child; its sentinel tells its end at once."""
        return self._process

    @property
    def failed(self) -> int:
        return self._failed_child + self._failed_here

    def _record(self, when: float, rec: dict) -> None:
        if rec["event"] == "start":
            name = self._name(rec, when)
        else:
            start = self._open.pop(rec["id"], None)
            name = start[0].get("name") if start else None
        if name:
            rec = convrecords.named(rec, name)
        if rec["event"] == "start":
            self._open[rec["id"]] = (rec, when)
        self.summary.add(rec)
        self._emit(rec)

    def _name(self, rec: dict, when: float) -> str | None:
        if self._name_for is None:
            return None
        address = ipaddress.ip_address(convrecords.split_endpoint(rec["original_destination"])[0])
        if not any(address in pool for pool in self._pools):
            return None  # only the DNS listener's pool addresses have names
        return self._name_for(address, when)

    def close(self, timeout: float = 10) -> None:
        """SIGTERM: the child ends what is still tracked; read its records to the end."""
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

    def _recover(self) -> None:
        """What a dead child left undone, from a dump of what conntrack still tracks: the
        starts it never sent (of this run's conversations), and the ends of all it started."""
        from nftdivert.observers import ctevents, links, observer

        try:
            live = ctevents.dump_marked(self._config.worker.ct_mark)
        except OSError:
            live = []
        listener_for = observer.listener_lookup(self._config, bound.read().is_bound)
        subnets, now = links.subnets(), time.time()
        for ev in live:
            if ev.id not in self._open:
                if ev.start_ns / 1e9 < self._since:
                    continue  # another run's (or without a stamp: nothing tells)
                when = convrecords.start_time(ev, now)
                self._record(when, convrecords.start_record(ev, when, listener_for(ev),
                                                            links.interface_for(ev.src, subnets)))
            start, started = self._open[ev.id]
            self._record(now, convrecords.end_record(ev, now, start, started))
        self.unended = len(self._open)
        self._open.clear()


def _serve(config: Config, conn, parent: int, clients_netns: str | None) -> None:
    """The child: observe until SIGTERM, then end what is still tracked."""
    from nftdivert.observers import observer

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # The data path first: under a flood the observer takes only CPU nobody
    # else wants; if it falls behind, the kernel drops events (counted), not packets.
    os.nice(NICE)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ports = _Bound()
    lock = threading.Lock()

    def send(message) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                stop.set()  # the parent is gone

    try:
        obs = observer.for_config(config, lambda rec, when: send(("record", when, rec)), ports.is_bound,
                                  clients_netns=clients_netns)
    except OSError as exc:
        send(("error", f"cannot watch conntrack for the conversation log: {exc}"))
        return
    send(("ready",))
    try:
        while not stop.wait(_STATS_SECONDS):
            send(("stats", obs.lost, obs.failed, obs.unended))
    finally:
        obs.close()
        send(("stats", obs.lost, obs.failed, obs.unended))
        conn.close()


class _Bound:
    """The host's bound ports as sock_diag says, at most BOUND_FRESH seconds old when asked."""

    def __init__(self) -> None:
        self._ports, self._at = bound.read(), time.monotonic()

    def is_bound(self, protocol: int, address: bytes, port: int) -> bool:
        if time.monotonic() - self._at > BOUND_FRESH:
            self._ports, self._at = bound.read(), time.monotonic()
        return self._ports.is_bound(protocol, address, port)
