"""Analyses: which task owns a client address at a given time (pure).

An orchestrator runs one analysis (a task) per VM and reuses the VM's
address for the next one. Each task holds its clients (addresses or
prefixes) from its start until its end; the table keeps every interval, so
a record can be tagged by when its conversation began, not by when it
arrived. Where intervals overlap (an address reused before the earlier task
was ended), the later start wins, then the longer prefix.

The analyses file lists tasks the same way the `task` command gives them:
    [[task]]
    id = "4711"
    clients = ["10.0.1.23", "10.0.2.0/28"]
    end = 2026-12-06T10:07:00Z    # optional; a TOML date-time or an RFC 3339 string
    profile = "sinkhole"          # optional: the [[profiles]] whose answers its clients get
(or the same as JSON: {"task": [{"id": ..., "clients": [...], "end": "..."}]}).
A task that names a profile gives its clients that profile's answers while
it runs, whatever their address would choose (profiles.py asks profile_of).
"""
from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass, replace
from functools import cached_property
from datetime import datetime, timezone

from nftdivert.errors import ConfigError

# A task id names the analysis's evidence directory: no '/', no leading dot.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_CLIENTS = 1024  # per task: a VM, a few, a subnet or two
MAX_TASKS = 4096  # in one analyses file

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
COMMAND, FILE = "command", "file"  # who started a task: only the file's own are ended by the file


def check_task(value: object, key: str = "TASK") -> str:
    if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
        raise ConfigError(key, value, "a task id is 1-64 letters, digits, '_', '.' and '-', "
                                      "starting with a letter or digit")
    return value


def check_profile(value: object, known, key: str = "--profile") -> str:
    """The name of one of the run's [[profiles]] (`known`: their names)."""
    if not isinstance(value, str) or value not in known:
        have = ", ".join(sorted(known)) or "none"
        raise ConfigError(key, value, f"no [[profiles]] of that name in the run's config (it has: {have})")
    return value


def client_network(value: object, key: str = "--client") -> Network:
    """An address (a /32 or /128) or a prefix, host bits clear."""
    if not isinstance(value, str):
        raise ConfigError(key, value, 'an address or prefix like "10.0.1.23" or "10.0.2.0/28"')
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(key, value, str(exc)) from None
    if getattr(net.network_address, "scope_id", None) is not None:
        raise ConfigError(key, value, "an IPv6 scope ('%...') has no place here")
    return net


def check_clients(values: object, key: str = "--client") -> tuple[Network, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(key, values, "at least one client address or prefix")
    if len(values) > MAX_CLIENTS:
        raise ConfigError(key, f"{len(values)} clients", f"at most {MAX_CLIENTS} per task")
    return tuple(client_network(v, f"{key}[{i}]") for i, v in enumerate(values))


@dataclass(frozen=True)
class Interval:
    """`task` owns the addresses of `network` from `start` until `end` (None: not ended), wall-clock seconds."""

    task: str
    network: Network
    start: float
    end: float | None = None
    source: str = COMMAND
    profile: str | None = None  # the [[profiles]] the task chose for its clients; None: their address's

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, when: float) -> bool:
        return (self.start <= when and (self.end is None or when < self.end)
                and address.version == self.network.version and address in self.network)

    def open_at(self, when: float) -> bool:
        return self.end is None or when < self.end


@dataclass(frozen=True)
class TaskTable:
    """Immutable: every change makes a new table, so readers in other threads need no lock."""

    intervals: tuple[Interval, ...] = ()
    retired: frozenset[str] = frozenset()  # tasks whose intervals were pruned: their ids stay taken

    def owner(self, address, when: float) -> str | None:
        """The task that owns `address` (text, bytes or an ipaddress object) at `when`, or None."""
        if not self.intervals:
            return None
        best = self._owning(_address(address), when)
        return best.task if best else None

    def profile_of(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, when: float) -> str | None:
        """The profile the task that owns `address` at `when` chose, or None (no task, or it chose none)."""
        best = self._owning(address, when) if self.intervals else None
        return best.profile if best else None

    def _owning(self, addr, when: float) -> Interval | None:
        best = None
        for iv in self._holding(addr):
            if iv.covers(addr, when) and (best is None or (iv.start, iv.network.prefixlen)
                                           > (best.start, best.network.prefixlen)):
                best = iv
        return best

    def choosing(self, when: float) -> TaskTable:
        """The intervals open at `when`, if one of them chose a profile (else none): what the listeners
        need to choose like profile_of, without the history (a task that chose none still hides an
        earlier one's choice)."""
        open_now = tuple(iv for iv in self.intervals if iv.open_at(when))
        return TaskTable(open_now) if any(iv.profile for iv in open_now) else TaskTable()

    def chosen(self, when: float) -> tuple[tuple[Network, str | None], ...]:
        """(network, profile) of the intervals open at `when`, the one that wins first (as owner() chooses)."""
        ordered = sorted(self.choosing(when).intervals, key=lambda iv: (iv.start, iv.network.prefixlen), reverse=True)
        return tuple((iv.network, iv.profile) for iv in ordered)

    def holding(self, address) -> TaskTable:
        """The intervals whose clients hold `address`, at any time: owner() over them is owner() over all."""
        return TaskTable(self._holding(_address(address)))

    def _holding(self, addr) -> tuple[Interval, ...]:
        hosts, prefixes = self._index
        return hosts.get(addr.packed, ()) + tuple(iv for iv in prefixes
                                                 if addr.version == iv.network.version and addr in iv.network)

    @cached_property
    def _index(self) -> tuple[dict[bytes, tuple[Interval, ...]], tuple[Interval, ...]]:
        """(single address -> its intervals, the wider prefixes): a lab's clients are mostly single
        VMs, and a record is tagged per conversation, so a lookup must not walk every task."""
        hosts: dict[bytes, tuple[Interval, ...]] = {}
        prefixes = []
        for iv in self.intervals:
            if iv.network.prefixlen == iv.network.max_prefixlen:
                key = iv.network.network_address.packed
                hosts[key] = hosts.get(key, ()) + (iv,)
            else:
                prefixes.append(iv)
        return hosts, tuple(prefixes)

    def known(self, task: str) -> bool:
        return task in self.retired or any(iv.task == task for iv in self.intervals)

    def running(self, task: str, when: float) -> bool:
        return any(iv.task == task and iv.open_at(when) for iv in self.intervals)

    def tasks(self, when: float, source: str | None = None) -> list[str]:
        """The tasks running at `when` (of that source), in start order, each once."""
        return list(dict.fromkeys(iv.task for iv in self.intervals
                                  if iv.open_at(when) and (source is None or iv.source == source)))

    def clients(self, task: str) -> tuple[Network, ...]:
        return tuple(iv.network for iv in self.intervals if iv.task == task)

    def end_of(self, task: str) -> float | None:
        return next((iv.end for iv in self.intervals if iv.task == task), None)

    def profiles(self, when: float) -> dict[str, str]:
        """task -> the profile it chose, of the tasks running at `when` that chose one."""
        return {iv.task: iv.profile for iv in self.intervals if iv.open_at(when) and iv.profile}

    def started(self, task: str, clients: tuple[Network, ...], when: float, end: float | None = None,
                source: str = COMMAND, profile: str | None = None) -> TaskTable:
        """With `task` started at `when`; a task id this table knows (running or ended) is refused."""
        if self.known(task):
            raise ConfigError("TASK", task, "duplicate: this run already has a task of that id")
        return replace(self, intervals=self.intervals + tuple(Interval(task, net, when, end, source, profile)
                                                              for net in clients))

    def ended(self, task: str, when: float) -> TaskTable:
        """With `task` ended at `when` (never before it started: its tagged records stay true)."""
        if not self.running(task, when):
            raise ConfigError("TASK", task, "unknown: no task of that id is running")
        return replace(self, intervals=tuple(replace(iv, end=max(when, iv.start))
                                             if iv.task == task and iv.open_at(when) else iv for iv in self.intervals))

    def pruned(self, before: float) -> TaskTable:
        """Without the intervals that ended before `before`: no record that late can need them."""
        kept = tuple(iv for iv in self.intervals if iv.end is None or iv.end >= before)
        gone = {iv.task for iv in self.intervals} - {iv.task for iv in kept}
        return TaskTable(kept, self.retired | gone)

    def due_ends(self, after: float, until: float) -> list[str]:
        """The tasks whose end time falls in (after, until]: ends the file set ahead of time."""
        return list(dict.fromkeys(iv.task for iv in self.intervals
                                  if iv.end is not None and after < iv.end <= until))


def _address(value) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(value)


@dataclass(frozen=True)
class TaskSpec:
    """A task as the analyses file lists it."""

    task: str
    clients: tuple[Network, ...]
    end: float | None = None
    profile: str | None = None


def parse_file(text: str, json_format: bool, key: str = "analyses.file",
               profiles=frozenset()) -> tuple[TaskSpec, ...]:
    """The analyses file's tasks; ConfigError names the first thing wrong. `profiles`: the names
    of the run's [[profiles]], which a task may choose."""
    try:
        data = json.loads(text) if json_format else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(key, "", f"not valid {'JSON' if json_format else 'TOML'}: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"task"}:
        raise ConfigError(key, sorted(data) if isinstance(data, dict) else data, 'only a list "task" of tables')
    items = data.get("task", [])
    if not isinstance(items, list) or len(items) > MAX_TASKS:
        raise ConfigError(f"{key} task", type(items).__name__, f"a list of at most {MAX_TASKS} tables")
    specs, seen = [], set()
    for i, item in enumerate(items):
        k = f"{key} task[{i}]"
        if not isinstance(item, dict) or set(item) - {"id", "clients", "end", "profile"} \
                or not {"id", "clients"} <= set(item):
            raise ConfigError(k, item, "a table with id, clients and (optional) end and profile")
        task = check_task(item["id"], f"{k}.id")
        if task in seen:
            raise ConfigError(f"{k}.id", task, "listed twice")
        seen.add(task)
        profile = item.get("profile")
        specs.append(TaskSpec(task, check_clients(item["clients"], f"{k}.clients"),
                              _end(item.get("end"), f"{k}.end"),
                              None if profile is None else check_profile(profile, profiles, f"{k}.profile")))
    return tuple(specs)


def _end(value: object, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(key, value, "an RFC 3339 date-time like 2026-12-06T10:07:00Z") from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError(key, str(value), "a date-time with its offset, like 2026-12-06T10:07:00Z")
    return value.astimezone(timezone.utc).timestamp()


def reconciled(table: TaskTable, specs: tuple[TaskSpec, ...], now: float) -> tuple[TaskTable, list[str], list[str]]:
    """The table after the file says `specs` at `now`: (table, started, ended).

    A task new to the table starts now (unless its end has passed already);
    a running task the file started and no longer lists ends now. A task
    the table knows is not started again, and a running one keeps its
    clients and profile; only its end follows the file (never into the past).
    """
    listed = {spec.task: spec for spec in specs}
    started, ended = [], []
    for task in table.tasks(now, FILE):
        if task not in listed:
            table = table.ended(task, now)
            ended.append(task)
    for spec in specs:
        if not table.known(spec.task):
            if spec.end is None or spec.end > now:
                table = table.started(spec.task, spec.clients, now, spec.end, FILE, spec.profile)
                started.append(spec.task)
        elif table.running(spec.task, now) and table.end_of(spec.task) != spec.end:
            end = None if spec.end is None else max(spec.end, now)
            table = replace(table, intervals=tuple(replace(iv, end=end) if iv.task == spec.task else iv
                                                   for iv in table.intervals))
    return table, started, ended
