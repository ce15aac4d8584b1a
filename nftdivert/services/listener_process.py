"""The built-in listeners in processes of their own.

In the worker's process they shared its interpreter lock with the queue
worker's hot path: `make bench` measured a third fewer diverted connections
per second that way. The child reports back over one pipe: ready or the
error that stopped it, each DNS question it answered, each address the DNS
pool gave to a name (the conversation log names conversations by them), and
its counters once a second, and what the recognised protocols log (TLS
handshakes, HTTP requests, mails, logins). A second pipe carries the
listener's questions about a conversation's original destination
(origin.py), a third a reload's answer sections (SIGHUP) and the tasks that
chose a profile for their clients, which each child acknowledges before
the task's start or end is done: a conversation after it gets what it
says (the analyses' table is the parent's; the listeners choose per
conversation, the DNS listener per question, without asking). It dies with
its parent (lifeline.py), so a `kill -9` of the worker does not leave the
listener ports taken for the next run.

Several processes (`listener_processes`; one per CPU by default) bind the
same ports with SO_REUSEPORT, so the kernel spreads connections and
datagrams over them by their addresses and ports (a UDP conversation stays
on one process). Each has its two pipes. The DNS listeners run in the
first only: one owner of the pools (every profile's too), so a name has
one address per pool for the whole run, and only that process reports
assignments; the others ask it over a channel of their own
(pool_channel.py: DoH, [[custom]] `names`, a proxy's `target_name`). FTP
data connections that reach another process than their session are handed
over (handoff.py).
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
from nftdivert.profiles import Profiles
from nftdivert.tasks import TaskTable
from nftdivert.services import handoff, origin, pool_channel
from nftdivert.observers.convrecords import split_endpoint
from nftdivert.services.names import NameHistory, Question
from nftdivert.process.child import READY, spawn, wait_ready
from nftdivert.services.listeners import Listeners, ListenerStats

_STATS_SECONDS = 1.0
_CATCH_UP_SECONDS = 1.0  # at most this long a name lookup waits for the pipe to be read
_CHOSEN_SECONDS = 5.0  # at most this long a task's start or end waits for every child to take it

Recycled = Callable[[float, str, str, str], None]  # when, address, old name, new name


def process_count(config: Config) -> int:
    """How many listener processes: the configured number, or one per CPU this run may use."""
    return config.listener_processes or len(os.sched_getaffinity(0))


class _Child:
    """One listener process, as the parent sees it: its pipes and the thread reading its reports."""

    def __init__(self, process, conn, origins: origin.Server, reloads) -> None:
        self.process, self.conn, self.origins, self.reloads = process, conn, origins, reloads
        self.stats: dict[str, ListenerStats] = {}
        self.pool_unanswered = 0  # its questions to the DNS pool's owner that got no answer in time
        self.chosen = 0  # the last tasks' choice it took (ListenerProcess.choose)
        self.gone = False  # its reports ended: it takes nothing more
        self.reader: threading.Thread | None = None


class ListenerProcess:
    """start() returns once every port is bound in every process, or raises OSError naming the listener."""

    def __init__(self, config: Config) -> None:
        self._config = config
        # Every pool (each profile's own too): its names and as many freed.
        self._names = NameHistory(2 * sum(dns.max_names for dns in config.dns_pools().values()))
        # Held while a message is read and applied; a name lookup waits on it
        # until the pool's assignments up to its moment have all arrived.
        self._applied = threading.Condition()
        self._applied_until = 0.0  # the child's time of the last assignment applied
        self._eof = False
        self._names_of = {lst.name for lst in config.listeners if lst.kind != "external"}
        self.on_question: Question | None = None
        self.on_recycled: Recycled | None = None
        self.on_event: Callable[[dict], None] | None = None  # a TLS handshake or HTTP request, as a log record
        self._children: list[_Child] = []
        self._ended: list[_Child] = []  # after stop: the counters they reported last
        # A reload (a signal handler: it may interrupt a stop's last task end in the main thread, so
        # reentrant) and a task's choice (the analyses' thread) on one pipe.
        self._sending = threading.RLock()
        self._choice = 0

    @property
    def origins(self) -> "list[origin.Server]":
        """The questions' pipes, one per process: the worker's loop answers them (answer_pending) when readable."""
        return [child.origins for child in self._children]

    def answer_origins(self, lookup) -> None:
        """From now on the listeners' origin questions are answered by `lookup(client, local)`."""
        for child in self._children:
            child.origins.lookup = lookup

    def ask_origins_later(self, ask) -> None:
        """From now on the listeners' origin questions go to `ask(client, local, protocol, reply)`,
        which answers by calling reply(answer) (several queue workers: the one that knows)."""
        for child in self._children:
            child.origins.ask_later = ask

    @property
    def processes(self) -> "list[multiprocessing.process.BaseProcess]":
        """The children while they run (none: only external listeners); each sentinel tells its end at once."""
        return [child.process for child in self._children]

    @property
    def stats(self) -> dict[str, ListenerStats]:
        """Each listener's counters, summed over the processes."""
        total = {name: ListenerStats() for name in self._names_of}
        for child in self._children or self._ended:
            for name, s in list(child.stats.items()):
                total[name] = ListenerStats(total[name].conversations + s.conversations,
                                            total[name].bytes_received + s.bytes_received)
        return total

    @property
    def pool_unanswered(self) -> int:
        """Questions the other processes asked the DNS pool's owner that it did not answer in time."""
        return sum(child.pool_unanswered for child in self._children or self._ended)

    @property
    def stats_by_process(self) -> list[dict[str, ListenerStats]]:
        """Each process's own counters, in the order they were started (the DNS owner first)."""
        return [dict(child.stats) for child in self._children or self._ended]

    def name_for(self, address, when: float | None = None) -> str | None:
        """The DNS name this address stood for at `when` (wall clock; None: now).

        The DNS owner reports an assignment before it answers the question, so
        once everything it sent up to `when` is read, the answer is exact.
        """
        deadline = time.monotonic() + _CATCH_UP_SECONDS
        with self._applied:
            while (when is not None and self._applied_until < when and self._unread()
                   and time.monotonic() < deadline):
                self._applied.wait(0.05)
            return self._names.name_at(address, when)

    def _unread(self) -> bool:
        owner = self._children[0].conn if self._children else None  # the DNS listeners' process
        try:
            return not self._eof and owner is not None and owner.poll(0)
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 15.0) -> None:
        if not self._names_of:
            return  # only external listeners: nothing to run
        ctx = multiprocessing.get_context("fork")  # the pipes' kind, as the children's
        count = process_count(self._config)
        inboxes = handoff.pairs(count) if count > 1 else None
        has_dns = any(lst.kind == "dns" for lst in self._config.listeners)
        pool = pool_channel.pairs(count) if count > 1 and has_dns else None
        try:
            for index in range(count):
                origin_parent, origin_child = ctx.Pipe()
                reload_child, reloads = ctx.Pipe(duplex=False)
                process, parent_end = spawn(f"nftdivert-listeners-{index}", _serve, self._config,
                                        origin_child, reload_child, index, count, inboxes, pool)
                origin_child.close()
                reload_child.close()
                self._children.append(_Child(process, parent_end, origin.Server(origin_parent), reloads))
                if index == 0:  # it found the ports free before the others join its sockets
                    self._wait_ready(0, timeout)
        finally:
            for pair in [*(inboxes or ()), *(pool or ())]:
                for end in pair or ():
                    end.close()
        for index in range(1, len(self._children)):  # every process ready before the ruleset may send them anything
            self._wait_ready(index, timeout)
        for index, child in enumerate(self._children):
            child.reader = threading.Thread(target=self._read, args=(child, index == 0),
                                            name="nftdivert-listener-events", daemon=True)
            child.reader.start()

    def _wait_ready(self, index: int, timeout: float) -> None:
        started = self._children[index]
        try:
            wait_ready(f"listener process {index}", started.conn, started.process.pid, timeout)
        except OSError:
            self.stop()
            raise

    def _read(self, child: _Child, owner: bool) -> None:
        conn = child.conn
        while True:
            try:
                conn.poll(None)  # outside the lock: a lookup may look meanwhile
                with self._applied:
                    message = conn.recv()
                    if message[0] == "assign":
                        _, when, address, name, _old = message
                        self._names.assign(ipaddress.ip_address(address), name, when)
                        self._applied_until = when
                    elif message[0] == "chosen":
                        child.chosen = message[1]
                    self._applied.notify_all()
            except (EOFError, OSError):
                with self._applied:
                    child.gone = True
                    self._eof = self._eof or owner
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
                    self.on_event(self._named(message[1], owner))
            elif message[0] == "stats":
                child.stats = {name: ListenerStats(conversations, received)
                               for name, (conversations, received) in message[1].items()}
                child.pool_unanswered = message[2]

    def _named(self, rec: dict, owner: bool) -> dict:
        """The record with the DNS name its original destination stood for.

        The owner's reader applies the names itself; another process's record
        waits until the owner's reports up to now are read (the client asked
        the name before it connected).
        """
        asked = rec.get("original_destination")
        if asked is not None and "name" not in rec:
            address = ipaddress.ip_address(split_endpoint(asked)[0])
            name = self._names.name_at(address) if owner else self.name_for(address, time.time())
            if name is not None:
                rec["name"] = name
        return rec

    def reload(self, config: Config) -> None:
        """The answer sections of `config` to every child; the first logs a `reload` record when
        applied (any logs one that fails)."""
        self._send(("reload", Profiles(config)))

    def choose(self, tasks: TaskTable) -> bool:
        """The tasks that chose a profile (tasks.TaskTable.choosing) to every child; True once each
        has taken them, False if one did not within _CHOSEN_SECONDS (or is gone)."""
        with self._applied:
            self._choice += 1
            choice = self._choice
        self._send(("tasks", choice, tasks))
        with self._applied:
            return self._applied.wait_for(lambda: all(child.chosen >= choice or child.gone
                                                      for child in self._children), _CHOSEN_SECONDS)

    def _send(self, message: tuple) -> None:
        with self._sending:
            for child in self._children:
                try:
                    child.reloads.send(message)
                except (OSError, ValueError):
                    pass  # the child is gone: its end is reported elsewhere

    def stop(self) -> None:
        for child in self._children:
            if child.process.is_alive():
                child.process.terminate()
        for child in self._children:
            child.process.join(timeout=5)
            if child.process.is_alive():
                child.process.kill()
                child.process.join()
        for child in self._children:
            if child.reader is not None:
                child.reader.join(timeout=5)
            child.origins.close()
            child.conn.close()
            child.reloads.close()
        self._ended, self._children = self._children or self._ended, []


def _serve(conn, config: Config, origins, reloads, index: int = 0, count: int = 1,
           inboxes=None, pool=None) -> None:
    """Child `index` of `count`: bind, say ready (or why not), serve, report, until SIGTERM."""
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

    if inboxes is not None:
        handoff.current = handoff.for_process(index, inboxes)
    resolver = None
    ends = pool_channel.ends_for(index, pool) if pool is not None else []
    if index > 0 and ends:  # the pool's owner answers for it
        resolver = pool_channel.Remote(ends[0])
    own = config.listeners if index == 0 else tuple(lst for lst in config.listeners if lst.kind != "dns")
    if any(lst.kind == "dns" for lst in own):
        from nftdivert.services.dns import Resolver  # dnspython: only where a DNS listener runs

        resolver = Resolver.from_config(
            config.dns, on_question=lambda *q: send(("dns", *q)),
            on_assign=lambda address, name, old: send(("assign", time.time(), str(address), name, old)))
    listeners = Listeners(own, ipv6=config.ipv6, resolver=resolver, http=config.http, tls=config.tls,
                          recognize=config.recognize, on_event=lambda rec: send(("event", rec)),
                          origin=origin.Client(origins).ask, server_first=config.server_first,
                          origin_in_kernel=config.divert_path == "kernel", small=config.small_services,
                          custom=config.custom, shared=count > 1, first=index == 0,
                          askers=ends if index == 0 else (), profiles=Profiles(config))
    try:
        listeners.start()
    except OSError as exc:
        send(("error", str(exc)))
        return
    send(READY)
    threading.Thread(target=_reloading, args=(reloads, listeners, send, index == 0), name="nftdivert-reload",
                     daemon=True).start()
    try:
        while not stop.wait(_STATS_SECONDS):
            send(_stats(listeners, resolver))
    finally:
        listeners.stop()
        send(_stats(listeners, resolver))
        conn.close()


def _stats(listeners: Listeners, resolver) -> tuple:
    unanswered = resolver.unanswered if isinstance(resolver, pool_channel.Remote) else 0
    return ("stats", {n: (s.conversations, s.bytes_received) for n, s in listeners.stats.items()}, unanswered)


def _reloading(reloads, listeners: Listeners, send, report: bool) -> None:
    """Each reload's answer sections, applied on the listeners' loop; a `reload` record says how it
    went (`report`: this process says it went well; every process says what failed). And the
    tasks that chose a profile, each choice acknowledged once taken."""
    while True:
        try:
            kind, *message = reloads.recv()
        except (EOFError, OSError):
            return
        if kind == "tasks":
            choice, tasks = message
            listeners.choose(tasks)
            send(("chosen", choice))
            continue
        profiles = message[0]
        try:
            listeners.reload(profiles)
            if report:
                send(("event", {"event": "reload", "sections": ["custom", "dns", "http", "profiles"]}))
        except OSError as exc:
            send(("event", {"event": "reload", "error": str(exc)}))
