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
from nftdivert.observers.admission import AdmissionLog, Tally
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
        self._names: dict[int, str] = {}  # conversation id -> name, until its end record
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
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def failed(self) -> int:
        return self._failed_child + self._failed_here

    def _record(self, when: float, rec: dict) -> None:
        if rec["event"] not in ("start", "end"):  # admission: no conversation, no name
            self.summary.add(rec)
            self._emit(rec)
            return
        if rec["event"] == "start":
            name = self._name(rec, when)
            if name:
                self._names[rec["id"]] = name
        else:
            name = self._names.pop(rec["id"], None)
        if name:
            rec = convrecords.named(rec, name)
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
        self._conn.close()


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

    def record(rec: dict, when: float) -> None:
        send(("record", when, rec))

    try:
        obs = observer.for_config(config, record, ports.is_bound, clients_netns=clients_netns)
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
        lost, failed = obs.lost + drops.lost + drops.tally.unrecorded, obs.failed + drops.failed
        return ("stats", lost, failed, obs.unended)

    send(("ready",))
    try:
        while not stop.wait(_STATS_SECONDS):
            send(stats())
    finally:
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
        self._ports, self._at, self._wall = bound.read(), time.monotonic(), time.time()

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
        self._ports, self._at, self._wall = bound.read(), time.monotonic(), time.time()
