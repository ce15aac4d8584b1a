"""The built-in listeners in a process of their own.

In the worker's process they shared its interpreter lock with the queue
worker's hot path: `make bench` measured a third fewer diverted connections
per second that way. The child reports back over one pipe: ready or the
error that stopped it, each DNS question it answered, each address the DNS
pool gave to a name (the conversation log names conversations by them), and
its counters once a second, and what the recognised protocols log (TLS
handshakes, HTTP requests, mails, logins). A second pipe carries the
listener's questions about a conversation's original destination
(origin.py), a third a reload's answer sections (SIGHUP). It dies with
its parent (lifeline.py), so a `kill -9` of the worker does not leave the
listener ports taken for the next run.
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
from nftdivert.services import origin
from nftdivert.observers.convrecords import split_endpoint
from nftdivert.services.names import NameHistory, Question
from nftdivert.lab.lifeline import die_with_parent
from nftdivert.services.listeners import Listeners, ListenerStats

_STATS_SECONDS = 1.0
_CATCH_UP_SECONDS = 1.0  # at most this long a name lookup waits for the pipe to be read

Recycled = Callable[[float, str, str, str], None]  # when, address, old name, new name


class ListenerProcess:
    """start() returns once every port is bound, or raises OSError naming the listener."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._names = NameHistory(4 * config.dns.max_names)  # two pools, each its names and as many freed
        # Held while a message is read and applied; a name lookup waits on it
        # until the pool's assignments up to its moment have all arrived.
        self._applied = threading.Condition()
        self._applied_until = 0.0  # the child's time of the last assignment applied
        self._eof = False
        self._stats: dict[str, ListenerStats] = {
            lst.name: ListenerStats() for lst in config.listeners if lst.kind != "external"}
        self.on_question: Question | None = None
        self.on_recycled: Recycled | None = None
        self.on_event: Callable[[dict], None] | None = None  # a TLS handshake or HTTP request, as a log record
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: threading.Thread | None = None
        self._conn = None
        self._origins: origin.Server | None = None
        self._reloads = None  # the pipe a reload's answer sections go down

    @property
    def origins(self) -> "origin.Server | None":
        """The questions' pipe: the worker's loop answers them (answer_pending) when it is readable."""
        return self._origins

    def answer_origins(self, lookup) -> None:
        """From now on the listener's origin questions are answered by `lookup(client, local)`."""
        if self._origins is not None:
            self._origins.lookup = lookup

    @property
    def process(self) -> "multiprocessing.process.BaseProcess | None":
        """The child while it runs (None: only external listeners); its sentinel tells its end at once."""
        return self._process

    @property
    def stats(self) -> dict[str, ListenerStats]:
        return self._stats

    def name_for(self, address, when: float | None = None) -> str | None:
        """The DNS name this address stood for at `when` (wall clock; None: now).

        The child reports an assignment before it answers the question, so
        once everything it sent up to `when` is read, the answer is exact.
        """
        deadline = time.monotonic() + _CATCH_UP_SECONDS
        with self._applied:
            while (when is not None and self._applied_until < when and self._unread()
                   and time.monotonic() < deadline):
                self._applied.wait(0.05)
            return self._names.name_at(address, when)

    def _unread(self) -> bool:
        try:
            return not self._eof and self._conn is not None and self._conn.poll(0)
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 15.0) -> None:
        if not self._stats:
            return  # only external listeners: nothing to run
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        origin_parent, origin_child = ctx.Pipe()
        reload_child, self._reloads = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_serve, args=(self._config, child_end, os.getpid(), origin_child,
                                                         reload_child),
                                    name="nftdivert-listeners", daemon=True)
        self._process.start()
        child_end.close()
        origin_child.close()
        reload_child.close()
        self._origins = origin.Server(origin_parent)  # served by the worker's loop (origins)
        self._conn = parent_end
        if not parent_end.poll(timeout):
            self.stop()
            raise OSError("the listener process did not come up")
        try:
            first = parent_end.recv()
        except EOFError:
            first = ("error", "the listener process exited while starting")
        if first[0] != "ready":
            self.stop()
            raise OSError(first[1])
        self._reader = threading.Thread(target=self._read, name="nftdivert-listener-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                self._conn.poll(None)  # outside the lock: a lookup may look meanwhile
                with self._applied:
                    message = self._conn.recv()
                    if message[0] == "assign":
                        _, when, address, name, _old = message
                        self._names.assign(ipaddress.ip_address(address), name, when)
                        self._applied_until = when
                    self._applied.notify_all()
            except (EOFError, OSError):
                with self._applied:
                    self._eof = True
                    self._applied.notify_all()
                return
            if message[0] == "dns":
                if self.on_question is not None:
                    self.on_question(*message[1:])
            elif message[0] == "assign":
                _, when, address, name, old = message
                if old is not None and self.on_recycled is not None:
                    self.on_recycled(when, address, old, name)
            elif message[0] == "event":
                if self.on_event is not None:
                    self.on_event(self._named(message[1]))
            elif message[0] == "stats":
                for name, (conversations, received) in message[1].items():
                    self._stats[name] = ListenerStats(conversations, received)

    def _named(self, rec: dict) -> dict:
        """The record with the DNS name its original destination stood for (this thread applies the names)."""
        asked = rec.get("original_destination")
        if asked is not None and "name" not in rec:
            name = self._names.name_at(ipaddress.ip_address(split_endpoint(asked)[0]))
            if name is not None:
                rec["name"] = name
        return rec

    def reload(self, config: Config) -> None:
        """The answer sections of `config` to the child; it logs a `reload` record when applied (or not)."""
        if self._reloads is not None:
            try:
                self._reloads.send((config.custom, config.http, config.dns))
            except (OSError, ValueError):
                pass  # the child is gone: its end is reported elsewhere

    def stop(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._origins is not None:
            self._origins.close()
        if self._conn is not None:
            self._conn.close()
        if self._reloads is not None:
            self._reloads.close()
            self._reloads = None
        self._process = self._reader = self._conn = self._origins = None


def _serve(config: Config, conn, parent: int, origins, reloads) -> None:
    """The child: bind, say ready (or why not), serve, report, until SIGTERM."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                stop.set()  # the parent is gone

    resolver = None
    if any(lst.kind == "dns" for lst in config.listeners):
        from nftdivert.services.dns import Resolver  # dnspython: only where a DNS listener runs

        resolver = Resolver.from_config(
            config.dns, on_question=lambda *q: send(("dns", *q)),
            on_assign=lambda address, name, old: send(("assign", time.time(), str(address), name, old)))
    listeners = Listeners(config.listeners, ipv6=config.ipv6, resolver=resolver, http=config.http, tls=config.tls,
                          recognize=config.recognize, on_event=lambda rec: send(("event", rec)),
                          origin=origin.Client(origins).ask, server_first=config.server_first,
                          origin_in_kernel=config.divert_path == "kernel", small=config.small_services,
                          custom=config.custom)
    try:
        listeners.start()
    except OSError as exc:
        send(("error", str(exc)))
        return
    send(("ready",))
    threading.Thread(target=_reloading, args=(reloads, listeners, send), name="nftdivert-reload", daemon=True).start()
    try:
        while not stop.wait(_STATS_SECONDS):
            send(("stats", {n: (s.conversations, s.bytes_received) for n, s in listeners.stats.items()}))
    finally:
        listeners.stop()
        send(("stats", {n: (s.conversations, s.bytes_received) for n, s in listeners.stats.items()}))
        conn.close()


def _reloading(reloads, listeners: Listeners, send) -> None:
    """Each reload's answer sections, applied on the listeners' loop; a `reload` record says how it went."""
    while True:
        try:
            custom, http, dns = reloads.recv()
        except (EOFError, OSError):
            return
        try:
            listeners.reload(custom, http, dns)
            send(("event", {"event": "reload", "sections": ["custom", "dns", "http"]}))
        except OSError as exc:
            send(("event", {"event": "reload", "error": str(exc)}))
