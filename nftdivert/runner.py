"""`nftdivert run`: listeners up, queues bound, ruleset applied, worker pumping;
and on the way out, everything but containment taken away again, whatever happened.

Order matters. The table is claimed first, so a second run cannot take over
a live one's table. Listeners next, so their ports are in the bound-port set
when the ruleset lands; queues bound before the ruleset, so the first
diverted packet finds a worker; the way out is registered before the ruleset
goes in, so a failure or a signal in between leaves no diverting table; on
the way out the ruleset goes first, so no packet is queued to a worker that
is leaving. A clean stop leaves the containment chain alone in the table
(containment_after_stop = "keep"), or nothing.

A child that dies (the listeners, the observer, the capture's reader) or a
log that fails stops the run by itself, at once: the loop watches their
sentinels. It fails closed before anything else, since a conversation
answered now would go unlogged (or be refused by nobody listening).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, fields, replace
from functools import partial
from typing import Callable, TextIO

from nftdivert import metrics, stats
from nftdivert.ruleset import bridges
from nftdivert.services import active, origin
from nftdivert.ruleset import engine, model, owner
from nftdivert.config import NATIVE_QUEUE, PROTOCOL_KINDS, Config, HttpConfig
from nftdivert.observers.convlog import ConversationLog
from nftdivert.observers import syslogship
from nftdivert.observers.ecs import to_ecs
from nftdivert.services.chosen import Answers
from nftdivert.errors import ConfigError, KernelError, NftDivertError, say as _say
from nftdivert.ruleset.kernel import Nft
from nftdivert.process.lifeline import process_ended
from nftdivert.services.listener_process import ListenerProcess
from nftdivert.ruleset.model import QUEUE_COPY_LIMIT
from nftdivert.observers.observation import Observation
from nftdivert.ruleset import bound_sets
from nftdivert.worker.pump import Ticker
from nftdivert.worker.processes import WorkerProcesses
from nftdivert.worker.queue import Worker, conntrack, queue_fixup

# How often the sets of bound ports follow the host's sockets: a service that
# binds after the start gets its own new conversations within this.
BOUND_REFRESH = 0.25  # seconds
SERVING_RENEW = 1.0  # seconds; the kernel path's fail-closed set (model.SERVING_TIMEOUT)
_KIND_NAMES = {"echo": "built-in echo", "dns": "built-in DNS", "external": "external program",
               **{kind: f"built-in {kind.upper()}" for kind in PROTOCOL_KINDS}}


class _BoundPorts:
    """The host's bound ports, as the worker and the kernel sets both see
    them, and its own unicast addresses (with the one `redirect` gives each
    interface, which the kernel path's sets are keyed by)."""

    def __init__(self, nft: Nft, rs: model.Ruleset) -> None:
        self.nft, self.rs = nft, rs
        self.ports = bound_sets.read()
        self.addresses = bound_sets.addresses()
        self.refusing = False

    def refuse(self) -> None:
        """The kernel path's fail closed, now: the `serving` set emptied, and renewed no more."""
        self.refusing = True
        if self.rs.kernel_path and self.rs.fail_closed:
            self.nft.run(f"flush set inet {self.rs.table} serving\n", source="fail closed")

    def is_local(self, address: bytes) -> bool:
        return address in self.addresses.local

    def refresh(self, serving: bool = False) -> None:
        """Mirror what changed into the table's sets; `serving`: renew the fail-closed set too."""
        addresses, now = bound_sets.addresses(), bound_sets.read()
        changed = now != self.ports or (self.rs.kernel_path and addresses.redirect_to != self.addresses.redirect_to)
        self.addresses = addresses
        text = ""
        if changed:
            self.ports = now
            text = engine.runtime_set_commands(self.rs, now, addresses)
        if serving and self.rs.kernel_path and self.rs.fail_closed and not self.refusing:
            text += bound_sets.serving_commands(self.rs.table)
        if text:
            self.nft.run(text, source="bound ports")


class _ClientBridges:
    """Gateway mode: the client-side bridges' ports in the bridge table's map,
    following ports and bridges that come and go (a new one's frames between
    clients are dropped, or bridged with `interfaces` set, until then)."""

    def __init__(self, nft: Nft, rs: model.Ruleset) -> None:
        self.nft, self.rs = nft, rs
        self.now = bridges.read(rs.interfaces) if rs.gateway else []

    def refresh(self) -> list[str]:
        """Mirror what changed into the map; what to say about bridges that came or went."""
        if not self.rs.gateway:
            return []
        now, before = bridges.read(self.rs.interfaces), self.now
        if now == before:
            return []
        self.nft.run(engine.bridge_commands(self.rs, now), source="bridge ports")
        self.now = now
        had = {b.name for b in before}
        gone = sorted(had - {b.name for b in now})
        return (bridges.describe([b for b in now if b.name not in had], self.rs.table)
                + [f"bridge {name} is gone" for name in gone])


def _log_stream(config: Config, stack: ExitStack) -> tuple[TextIO | None, bool]:
    target, fmt = config.worker.log, config.worker.log_format
    if target == "":
        return None, True
    try:
        stream = sys.stdout if target == "-" else stack.enter_context(open(target, "a", encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("worker.log (--log)", target, exc.strerror or str(exc)) from None
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    return stream, as_json


def _conntrack_lookup(stack: ExitStack):
    ct = conntrack(stack)
    return ct.entry if ct is not None else None


def run(config: Config, *, pcap_path: str | None = None, on_ready: Callable[[], object] | None = None,
        summary_path: str | None = None, clients_netns: str | None = None,
        reread: Callable[[], Config] | None = None) -> dict:
    """Run until SIGINT or SIGTERM; returns the final counters. Leaves nothing behind.

    `on_ready` is called once the ruleset is in place and the worker is about to pump.
    The table of what was contacted goes to stderr at the end, and as JSON to
    `summary_path`. `clients_netns`: where the clients live (the sandbox's),
    for naming their processes.
    """
    nft = Nft()
    if pcap_path:  # -w: into the config, whose ruleset then carries the capture chains
        config = replace(config, worker=replace(config.worker, pcap=pcap_path))
    # Until the worker pumps, a signal unwinds the stack (and so cleans up).
    previous = {s: signal.signal(s, _stop_early) for s in (signal.SIGINT, signal.SIGTERM)}
    if reread is not None:  # a reload asked for before the listeners run has nothing to reload yet
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        final, failure = _run(config, nft, on_ready, Observation(summary_path, clients_netns), reread)
        if failure is not None:  # the counters, then the one line that says why
            _say(stats.summary(final))
            raise NftDivertError(failure)
        return final
    except _Stopped:
        _say("stopped before the worker started")
        return {}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _reload(reread: Callable[[], Config], running: Config, listeners: ListenerProcess, log: ConversationLog,
            apply: Callable[[Config], None]) -> None:
    """SIGHUP: read the config again and give the listeners its answer sections; a bad one changes
    nothing, and neither does one that changes anything else (the ruleset, the run). `apply`: what
    the run itself takes from it (the profiles' ports left alone, their hooks)."""
    try:
        config = reread()
        changed = not_reloadable(running, config)
        if changed:
            raise ConfigError(", ".join(changed), "changed", "a reload gives only [[custom]], [dns] records and "
                              "one_address, [http] and [[profiles]] (on the run's DNS pools) anew; for the rest "
                              "(the ruleset, the run, a new DNS pool) restart it")
        apply(config)
    except (ConfigError, KernelError, OSError) as exc:
        _say(f"reload refused, the answers stay as they were: {exc}")
        log.event({"event": "reload", "error": str(exc)})
        return
    _say("reload: [[custom]], [dns] records and one_address, [http] rules, [[profiles]] read again")
    listeners.reload(config)


def not_reloadable(running: Config, new: Config) -> list[str]:
    """The keys `new` changes that a reload cannot apply: all but the answer sections, and a profile's
    DNS pool that the run does not have as it is (pure)."""
    def rest(c: Config) -> Config:
        return replace(c, custom=(), http=HttpConfig(), dns=replace(c.dns, records=(), one_address=""), profiles=(),
                       worker=replace(c.worker, pcap=""))  # -w: from the command line, not the file
    was, now = rest(running), rest(new)
    changed = [f.name for f in fields(Config) if getattr(was, f.name) != getattr(now, f.name)]
    # A profile's pool must be one the run has, as it is: the listeners keep each pool with its names,
    # and the log's naming history is as large as the run's pools.
    pools = {net: (dns.max_names, dns.pool_key) for net, dns in running.dns_pools().items()}
    for key, dns in new.dns_sections()[1:]:
        for name, net in zip(("answer_v4", "answer_v6"), dns.pools()):
            if pools.get(net) != (dns.max_names, dns.pool_key):
                changed.append(f"{key}.{name}")
    return changed


class _Stopped(Exception):
    pass


def _stop_early(*_args) -> None:
    raise _Stopped


def _run(config: Config, nft: Nft, on_ready: Callable[[], object] | None,
         seen: Observation, reread: Callable[[], Config] | None = None) -> tuple[dict, str | None]:
    """(the final counters, why the run stopped by itself or None)."""
    with ExitStack() as stack:
        claim = owner.claim(config.table)  # refused while another live run owns the table
        stack.callback(claim.release)
        active.remove_stale()  # a killed run's port-20 rule for active FTP
        # Files first: a path that cannot be opened is bad input, found before anything starts.
        stream, as_json = _log_stream(config, stack)
        collector_tls = syslogship.tls_context(config.syslog)  # bad certificate files: found before anything starts
        seen.open_summary(stack)
        capture = _start_capture(config, stack)  # before any thread of ours: the reader is a fork
        pcap_path = config.worker.pcap_rewritten or None
        pcap = None
        if pcap_path:
            from nftdivert.observers.pcap import PcapWriter
            try:
                pcap = PcapWriter(pcap_path)
            except OSError as exc:
                raise ConfigError("worker.pcap_rewritten (--write-rewritten)", pcap_path,
                                  exc.strerror or str(exc)) from None
            stack.push(partial(_close_capture, pcap, pcap_path))

        # Forked before any thread of ours exists, as the listeners are.
        team = _worker_processes(config, stack)
        # Started before any thread of ours exists: the listener process is a fork.
        listeners = ListenerProcess(config)
        try:
            listeners.start()
        except OSError as exc:
            raise NftDivertError(f"cannot start the built-in listeners: {exc}") from None
        stack.callback(listeners.stop)
        for lst in config.listeners:
            _say(f"listener {lst.name}: {lst.protocol} port {lst.port} ({_KIND_NAMES[lst.kind]})")
        if capture is not None:
            _say(f"capturing what the clients send and get to {capture.path} (nflog group {capture.group})")
        if pcap is not None:
            _say(f"capturing diverted packets as the worker rewrites them to {pcap_path}")

        log_failed, log_wake = _wake_pipe(stack)  # before the log: its thread may use it until log.close
        sender = None
        if config.syslog.address:  # after the log's last record (the stack unwinds backwards): sends what waits
            sender = syslogship.SyslogSender(config.syslog, collector_tls)
            stack.callback(sender.close)
            _say(f"records also to the syslog collector {config.syslog.address}"
                 f"{' over TLS' if collector_tls else ''} (buffer {config.syslog.buffer} records)")
        log = ConversationLog(stream, as_json, schema=to_ecs if config.worker.log_schema == "ecs" else None,
                              ship=sender.offer if sender is not None else None,
                              dns_listeners=frozenset(lst.name for lst in config.listeners if lst.kind == "dns"))
        stack.callback(log.close)
        log.on_error = log_wake
        listeners.on_question = log.dns_question
        listeners.on_recycled = log.dns_recycled
        listeners.on_event = log.event

        rs = model.build(config, NATIVE_QUEUE)  # what the sets are; the backend is not asked yet
        ports = _BoundPorts(nft, rs)
        client_bridges = _ClientBridges(nft, rs)
        hooks = None
        answers = Answers(config, listeners)  # the answers in effect: a reload, a task's profile change them
        if config.hooks.first_conversation or config.profiles:
            from nftdivert.observers.hooks import Hooks

            hooks = Hooks(config.hooks, log.event, lambda address: answers.profiles.profile_for(address).hooks)
            stack.callback(hooks.close)  # after the observer's last records, before the log closes
        # Before the observer: it tags by the analyses' table.
        analyses = _analyses(config, log, capture, stack, answers.tasks_changed)
        observer = seen.start(config, stack, log, listeners.name_for, hooks,
                              profile_for=lambda address, when: answers.profiles.profile_for(address, when).profile,
                              named=lambda: answers.profiles.named)
        fixup = None if rs.kernel_path or team is not None else queue_fixup(config, stack, ports.is_local)
        # The listener's origin questions: the worker's table (queue path), and
        # conntrack on a socket of their own (on the kernel path it knows everything);
        # with several workers, the one that owns the client answers.
        if team is not None:
            listeners.ask_origins_later(team.ask)
        else:
            listeners.answer_origins(partial(origin.original, fixup.table if fixup else None,
                                             _conntrack_lookup(stack)))
        statsfile = stats.stats_path(config.table)
        stack.callback(metrics.remove, config.worker.metrics_file)  # the counters go with the run
        metrics.serve(config.worker.metrics_listen, statsfile, config.table, stack)
        warned = False
        due = {"stats": 0.0, "serving": 0.0}

        def warn_once() -> None:
            nonlocal warned
            if not warned and (fixup.counters.dropped if fixup is not None else
                               team.counters().get("packets", {}).get("dropped", 0) if team is not None else 0):
                warned = True
                _say(f"warning: dropped a packet larger than the queue copies ({QUEUE_COPY_LIMIT} bytes): it cannot "
                     "be rewritten; such packets are counted as 'dropped' and not reported again")

        def snapshot(fresh: bool = False) -> dict:
            """The run's counters; `fresh`: the workers' asked for now, not their last report."""
            if rs.kernel_path:
                snap = _kernel_snapshot(_counted(engine.diverted, config.table, nft), listeners, log, observer)
            else:
                counts = team.counters(fresh) if team is not None else pump.counters()
                snap = _snapshot(counts, listeners, log, observer, _admission(config.table, nft))
            running = {"tasks": analyses.table.tasks(time.time())} if analyses is not None else {}
            return {**snap, **_counted(engine.spoofed, config.table, nft), **_shipped(sender), **running}

        def tick(now: float) -> None:
            renew = now >= due["serving"]
            try:
                ports.refresh(serving=renew)
                if renew:
                    due["serving"] = now + SERVING_RENEW
            except (KernelError, OSError) as exc:
                _say(f"could not update the bound-port sets: {exc}")
            try:
                for line in client_bridges.refresh():
                    _say(line)
            except (KernelError, OSError) as exc:
                _say(f"could not update the bridge ports: {exc}")
            warn_once()
            if now >= due["stats"]:
                due["stats"] = now + 0.9  # about once a second, whatever the tick
                stats.write(statsfile, snapshot(), config)
            stopped = capture.failed() if capture is not None else None
            if stopped:  # stop rather than divert uncaptured
                raise NftDivertError(stopped)
            if pcap is not None:
                try:
                    pcap.flush()
                except OSError as exc:  # disk full, EIO: stop rather than divert uncaptured
                    raise _capture_failed(pcap_path, exc) from None

        if fixup is None:  # the kernel path, or workers of their own: the tick and the readers alone
            pump = Ticker(tick, BOUND_REFRESH)
        else:
            pump = Worker(config, fixup, pcap=pcap, tick=tick, tick_seconds=2 * BOUND_REFRESH)
            pump.bind()
        stack.callback(pump.close)
        if team is not None:
            team.serve(pump)
        for questions in listeners.origins:  # each listener process's questions, between turns of packets
            pump.add_reader(questions.fileno(), questions.answer_pending)
        failure: list[str] = []

        def stop_now(why: Callable[[], str]) -> None:
            """In the pump's thread: fail closed first (new conversations dropped, none answered
            unlogged or refused by a dead listener), then say why (it may wait: a child that has
            closed its files may take a while to finish dying), then stop; the first why is the run's."""
            if not failure:
                if fixup is not None:
                    fixup.refusing = True
                if team is not None:
                    team.refuse()
                try:
                    ports.refuse()
                except (KernelError, OSError) as exc:
                    _say(f"could not empty the serving set: {exc}")
                failure.append(why())
            pump.stop()

        unlogged = "answer conversations that would not be logged"
        _watch_children(pump, stop_now, [*((process, "the built-in listeners' process", "refuse every new conversation")
                                           for process in listeners.processes),
                                         *((process, f"queue worker {index}", "leave its clients unanswered")
                                           for index, process in enumerate(team.processes if team else ())),
                                         (observer.process, "the conversation observer", unlogged)])
        if capture is not None:
            pump.add_reader(capture.sentinel, lambda: stop_now(lambda: capture.failed() or "the capture stopped"))
        pump.add_reader(log_failed,
                        lambda: stop_now(lambda: f"{_log_error(config, log)}: stopping, rather than {unlogged}"))
        stack.callback(lambda: statsfile.unlink(missing_ok=True))

        stack.callback(_leave_table, config, nft)  # before apply: a commit may precede a failure
        applied = engine.apply(config, nft, claim, serving=True)
        answers.ruleset_in()  # the profiles' ports the running tasks chose (the analyses file's) into its sets
        stack.callback(answers.ruleset_out)  # before the table goes
        due["serving"] = time.monotonic() + SERVING_RENEW
        if rs.kernel_path:
            _say(f"table inet {applied.table} applied; divert path kernel ({applied.reason})")
        else:
            _say(f"table inet {applied.table} applied; queue backend {applied.backend} ({applied.reason})")
        for line in bridges.describe(client_bridges.now, config.table):
            _say(line)
        _say(f"mode {config.mode}; diverting unbound ports; Ctrl-C or SIGTERM stops, "
             + ("and containment stays until `nftdivert remove`" if applied.ruleset.contain_after_stop
                else "and removes everything"))

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: pump.stop())
        def reloaded(new: Config) -> None:
            """The profiles' ports left alone into the table's sets, then their hooks; a task may choose them."""
            answers.reloaded(new)
            if analyses is not None:
                analyses.profile_names = frozenset(p.name for p in new.profiles)

        if reread is not None:  # SIGHUP: the answer sections again, from the config file
            signal.signal(signal.SIGHUP, lambda *_: _reload(reread, config, listeners, log, reloaded))
        stats.write(statsfile, snapshot(), config)
        if on_ready is not None:
            on_ready()
        pump.run()
        warn_once()
        _say("stopping: removing the ruleset" + ("" if rs.kernel_path else ", unbinding the queues"))
        final = snapshot(fresh=True)  # the table is still loaded
        final.pop("tasks", None)  # the stop ends them (below, with their evidence)
    # Now the observer has ended what was left and the log is written out.
    final["log"] = _log_counts(log, observer)
    final.update(_shipped(sender))  # what the collector took, and what it missed, once the sender has stopped
    if sender is not None and sender.error:
        _say(f"syslog collector {config.syslog.address}: {sender.error}")
    final.update(_listener_counts(listeners))  # their last reports, sent as they stopped
    if not failure and log.error is not None:  # it failed on the way out: the end records
        failure.append(_log_error(config, log))
    return final, (failure[0] if failure else None)


def _worker_processes(config: Config, stack: ExitStack):
    """Several queue workers (queue.workers), each in a process of its own with its queues bound,
    stopped after the ruleset has gone; None for one worker (the run's own loop) or none."""
    count = config.queue_workers()
    if count <= 1:
        return None
    team = WorkerProcesses(config, count, origin.original)
    team.start()
    stack.callback(team.stop)
    _say(f"{count} queue workers (pids {', '.join(str(p.pid) for p in team.processes)}), "
         f"each owning the clients its queues {config.queue.incoming}-{config.queue.incoming + count - 1} "
         f"and {config.queue.outgoing}-{config.queue.outgoing + count - 1} bring it")
    return team


def _analyses(config: Config, log: ConversationLog, capture, stack: ExitStack, on_change=None):
    """The analyses' table, its control socket and file (`nftdivert task`): records tagged with
    their task, each task's evidence apart. Closed after the observer's last records.
    `on_change(table)`: each new table, as the profiles the tasks chose follow it."""
    if config.worker.log == "":
        return None
    from nftdivert.observers.analyses import Analyses

    analyses = Analyses(config, log, capture)
    analyses.on_change = on_change
    try:
        analyses.open()
    except OSError as exc:
        raise NftDivertError(f"cannot serve the analyses' control socket: {exc.strerror or exc}") from None
    stack.callback(analyses.close)
    log.tasks, log.route = analyses.owner, analyses.route
    if config.analyses.file:
        _say(f"analyses: watching {config.analyses.file}"
             + (f"; each task's evidence in {config.analyses.directory}/TASK" if config.analyses.directory else ""))
    return analyses


def _watch_children(pump, stop_now: Callable[[Callable[[], str]], None], children: list) -> None:
    """A child that ends stops the run at once: its sentinel (closed with its files, before it
    has finished dying) is read between the pump's turns."""
    for process, what, rather in children:
        if process is None:
            continue

        def ended(process=process, what=what, rather=rather) -> bool:
            stop_now(lambda: f"{what} {process_ended(process)}: stopping, rather than {rather}")
            return False
        pump.add_reader(process.sentinel, ended)


def _wake_pipe(stack: ExitStack) -> tuple[int, Callable[..., None]]:
    """(a read end the pump watches, a call that makes it readable from any thread)."""
    wake_r, wake_w = os.pipe()
    stack.callback(os.close, wake_r)
    stack.callback(os.close, wake_w)
    return wake_r, lambda *_: os.write(wake_w, b"x")


def _log_error(config: Config, log: ConversationLog) -> str:
    target = config.worker.log
    return f"cannot write the conversation log {'on stdout' if target == '-' else target}: " \
           f"{log.error.strerror or log.error}"


def _start_capture(config: Config, stack: ExitStack):
    """The capture (-w): the reader of the table's nflog group, stopped after the ruleset is gone."""
    path = config.worker.pcap
    if not path:
        return None
    from nftdivert.observers import capture as capture_mod
    try:
        fd = capture_mod.open_file(path)
    except OSError as exc:
        raise ConfigError("worker.pcap (-w)", path, exc.strerror or str(exc)) from None
    cap = capture_mod.NflogCapture(fd, config.worker.pcap_group, path, split=bool(config.analyses.directory))
    cap.start()
    stack.push(partial(_stop_capture, cap))
    return cap


def _stop_capture(cap, exc_type, *_exc) -> bool:
    """Stop the capture and say what it holds; a write failure is the run's error unless it already has one."""
    counts = cap.stop()
    if "packets" in counts:
        _say(f"capture {cap.path}: {counts['packets']} packets, {counts['overruns']} overruns (packets lost); "
             f"its reader used {counts['cpu_seconds']:.2f} s CPU")
    if counts.get("error"):
        if exc_type is None:
            raise NftDivertError(counts["error"])
        _say(f"the capture {cap.path} is incomplete: {counts['error']}")
    return False


def _capture_failed(path: str, exc: OSError) -> NftDivertError:
    return NftDivertError(f"cannot write the capture {path}: {exc.strerror or exc}")


def _close_capture(pcap, path: str, exc_type, *_exc) -> bool:
    """Close the capture; a failure is the run's error unless it already has one."""
    try:
        pcap.close()
    except OSError as exc:
        if exc_type is None:
            raise _capture_failed(path, exc) from None
        _say(f"the capture {path} is incomplete: {exc.strerror or exc}")
    return False


def _leave_table(config: Config, nft: Nft) -> None:
    # The first step on the way out: a second Ctrl-C must not cut it short.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if engine.after_stop(config, nft):
        _say(f"containment stays: table inet {config.table} drops what clients would route onward, and with "
             f"table bridge {config.table} what clients of a bridge send each other; nothing is diverted; "
             "`nftdivert remove` takes it away")


def _admission(table: str, nft: Nft) -> dict[str, int]:
    return _counted(engine.admission_drops, table, nft)


def _counted(read: Callable[[str, Nft], dict[str, int]], table: str, nft: Nft) -> dict[str, int]:
    try:
        return read(table, nft)
    except (KernelError, OSError):
        return {}  # counters are a courtesy; diverting goes on


def _snapshot(counters: dict, listeners: ListenerProcess, log: ConversationLog, observer,
              admission: dict[str, int]) -> dict:
    """The queue path's counters: the workers' (summed), the listeners', the log's."""
    return {
        "pid": os.getpid(),
        "updated": time.time(),
        **counters,
        "log": _log_counts(log, observer),
        **_listener_counts(listeners),
        "admission": admission,
    }


def _log_counts(log: ConversationLog, observer) -> dict:
    return {"written": log.written, "dropped": log.dropped, "failed": log.failed + observer.failed,
            "events_lost": observer.lost, "ends": observer.ends()}


def _shipped(sender) -> dict:
    return {"syslog": sender.counts()} if sender is not None else {}


def _kernel_snapshot(diverted: dict[str, int], listeners: ListenerProcess, log: ConversationLog, observer) -> dict:
    return {
        "pid": os.getpid(),
        "updated": time.time(),
        "path": "kernel",
        "diverted": diverted,
        "log": _log_counts(log, observer),
        **_listener_counts(listeners),
    }


def _listener_counts(listeners: ListenerProcess) -> dict:
    """Their counters summed; with several processes each one's conversations, and the questions
    the DNS pool's owner left unanswered."""
    counts: dict = {"listeners": {name: asdict(s) for name, s in listeners.stats.items()}}
    by_process = listeners.stats_by_process
    if len(by_process) > 1:
        counts["listener_processes"] = [sum(s.conversations for s in own.values()) for own in by_process]
        counts["pool_unanswered"] = listeners.pool_unanswered
    return counts
