"""The ruleset's life in the kernel: check, apply, diff, remove, status.

Everything here goes through libnftables (kernel.Nft) and the queue backend;
the text itself comes from render, which knows nothing of the kernel.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from nftdivert.ruleset import backends, bound_sets, model, owner, render, scratch
from nftdivert.ruleset import bridges
from nftdivert.ruleset.backends.base import QueueBackend
from nftdivert.config import NATIVE_QUEUE, XT_QUEUE, Config
from nftdivert.errors import KernelError, NftDivertError, clip
from nftdivert.ruleset.kernel import FAMILIES, Nft, refuse_file_reads, table_ref


@dataclass(frozen=True)
class Applied:
    table: str
    backend: str
    reason: str
    ruleset: model.Ruleset


def backend_for(config: Config, nft: Nft) -> tuple[QueueBackend, str]:
    return backends.select(config.queue.backend, nft, config.divert_path)


# The kernel lets only root of the first user namespace rewrite headers: in
# a user namespace of our own, such rules are checked without their write.
# The bridge table's link-layer rewrite becomes a lookup of the same map; the
# admission drop's write of the address asked for (before it is logged) goes.
_UNPRIVILEGED_WRITES = (
    (re.compile(r"\bether daddr set (iif) map (@\w+) "), r"\1 \2 ",
     "unprivileged, the bridge table's link-layer rewrite (ether daddr set) was checked without "
     "its write: the kernel lets only root load one"),
    (re.compile(r"\b(ip6?) daddr set ct original \1 daddr "), "",
     "unprivileged, the admission rules' rewrite of the address asked for (ip daddr set) was checked "
     "without its write: the kernel lets only root load one"),
)


def check_text(text: str, nft: Nft | None = None, table: str = "nftdivert", source: str = "ruleset") -> list[str]:
    """Dry-run `text` against the running kernel; nothing changes. Raises on rejection;
    returns notes on what could not be checked as it is.

    Text that would make libnftables read other files is refused first (bad input).
    """
    refuse_file_reads(text, source)
    if nft is not None:
        nft.run(text, dry_run=True, source=source)
        return []
    # not root: a user + network namespace of our own
    notes = []
    for pattern, replacement, note in _UNPRIVILEGED_WRITES:
        text, writes = pattern.subn(replacement, text)
        if writes:
            notes.append(note)
    scratch.run("check", text, table)
    return notes


def check(config: Config, nft: Nft | None) -> tuple[str, str, list[str]]:
    """Dry-run the config's ruleset for the backend this kernel gets; (backend, reason, notes)."""
    if nft is not None:
        backend, reason = backend_for(config, nft)
        name = backend.name
    elif config.queue.backend == "auto":
        name = scratch.run("probe", "", config.table).strip()
        reason = "auto: probed in a user namespace"
    else:
        name, reason = config.queue.backend, "set in the config"
    return name, reason, check_text(render.render_for(config, name), nft, config.table)


def apply(config: Config, nft: Nft, claim: owner.Claim | None = None, serving: bool = False) -> Applied:
    """Replace nftdivert's table in one transaction, then the backend's extras.

    The rendered text starts with `table; delete table; table {...}`, so the
    kernel swaps old for new atomically; if it refuses, the old table stays.
    `claim`: the run that owns the table. Without one, a table a live run
    owns is only loaded again with that run's own ruleset. `serving`: a run
    serves the default listeners from now on (the kernel path's fail-closed set).
    """
    backend, reason = backend_for(config, nft)
    rs = model.build(config, backend.name)
    text = render.render(rs)
    if claim is None:
        owner.check_apply(rs.table, text)
    else:
        claim.record(text)
    previous = {family: nft.list_table(rs.table, stateless=False, family=family) for family in FAMILIES}
    previous_xt = _xt_rules_if_readable(rs.table, nft)
    # Gateway mode's bridge table, left by an earlier apply in another mode, goes in the same transaction.
    stale = f"delete table {table_ref(rs.table, 'bridge')}\n" if not rs.gateway and previous["bridge"] else ""
    nft.run(text + stale + runtime_set_commands(rs, bound_sets.read(), bound_sets.addresses(), serving)
            + bridge_commands(rs, bridges.read(config.interfaces)))
    try:
        backend.install(rs)
        # A table of ours from another backend leaves its rules behind otherwise.
        for other in backends.BACKENDS.values():
            if other is not type(backend):
                other(nft).remove(rs.table)
    except (NftDivertError, OSError) as exc:
        raise _take_back(rs.table, previous, previous_xt, nft, exc) from None
    return Applied(rs.table, backend.name, reason, rs)


def runtime_set_commands(rs: model.Ruleset, ports: bound_sets.BoundPorts, addresses: bound_sets.Addresses,
                         serving: bool = False) -> str:
    """What fills the sets `run` keeps fresh: the bound ports and, on the kernel path,
    where they are bound as its rules ask, and the fail-closed set."""
    text = bound_sets.set_commands(rs.table, ports)
    if rs.kernel_path:
        text += bound_sets.kernel_path_commands(rs.table, ports, addresses.redirect_to, gateway=rs.gateway, local=rs.local)
        if serving and rs.fail_closed:
            text += bound_sets.serving_commands(rs.table)
    return text


def bridge_commands(rs: model.Ruleset, client_bridges: list[bridges.Bridge]) -> str:
    """Gateway mode: what fills the bridge table's map with the client-side bridges' ports."""
    return bridges.map_commands(rs.table, client_bridges) if rs.gateway else ""


def _xt_rules_if_readable(table: str, nft: Nft) -> list[str] | None:
    """Our xt rules now; None without iptables (then an apply cannot add any either)."""
    try:
        return backends.XtQueue(nft).installed(table)
    except KernelError:
        return None


def _take_back(table: str, previous: dict[str, str | None], previous_xt: list[str] | None, nft: Nft,
               exc: Exception) -> KernelError:
    """Undo an apply that failed after its commit: the tables as they were (or none), our xt rules as they were.

    Otherwise the new table would stay, marking packets that no rule queues.
    """
    try:
        for family, text in previous.items():
            if text is None:
                if nft.has_table(table, family):
                    nft.delete_table(table, family)
            else:
                ref = table_ref(table, family)
                nft.run(f"table {ref}\ndelete table {ref}\n{text}", source="previous table")
        done = "removed" if previous["inet"] is None else "the previous table is restored"
        if previous_xt is not None:
            backends.XtQueue(nft).restore(table, previous_xt)
    except (NftDivertError, OSError) as undo:
        return KernelError(clip(f"apply of table inet {table} failed after the kernel loaded it ({exc}), "
                                f"and taking it back failed too: {undo}"))
    return KernelError(clip(f"apply of table inet {table} failed after the kernel loaded it, "
                            f"so it was taken back ({done}): {exc}"))


def remove(table: str, nft: Nft) -> list[str]:
    """Take away the tables and any xt rules of ours; idempotent. Says what went."""
    gone = []
    for family in FAMILIES:
        if nft.has_table(table, family):
            nft.delete_table(table, family)
            gone.append(f"table {family} {table}")
    return gone + _remove_queue_rules(table, nft)


def _remove_queue_rules(table: str, nft: Nft) -> list[str]:
    gone = []
    for cls in backends.BACKENDS.values():
        n = cls(nft).remove(table)
        if n:
            gone.append(f"{n} {cls.name} queue rule(s)")
    return gone


def after_stop(config: Config, nft: Nft) -> bool:
    """Leave what a clean stop leaves: the containment chain alone, or nothing.

    The containment-only table replaces the full one in one transaction, so
    forwarded traffic is never let through in between. True: containment stays.
    """
    rs = model.build(config, NATIVE_QUEUE)
    text = render.render_after_stop(rs)
    if text is None:
        remove(config.table, nft)
        return False
    nft.run(text + bridge_commands(rs, bridges.read(config.interfaces)), source="after stop")
    _remove_queue_rules(config.table, nft)
    return True


# The named counter of the gateway's reverse-path check (drop_spoofed in the template).
SPOOFED = "spoofed"

# The bound-port and admission sets, and the bridge table's map of ports,
# change at run time by design: never drift.
_RUNTIME_ELEMENTS = re.compile(
    r"(\t(?:set (?:(?:bound|admit)_(?:tcp|udp)_v[46]|bound_on_interface|bound_on_loopback|serving)"
    r"|map client_ports|set client_port_indexes) \{\n(?:\t\t(?!elements)[^\n]*\n)*)\t\telements = \{[^}]*\}\n")


def _comparable(text: str) -> str:
    return _RUNTIME_ELEMENTS.sub(r"\1", text)


@dataclass(frozen=True)
class Drift:
    backend: str
    diff: str = ""
    missing_table: bool = False

    @property
    def same(self) -> bool:
        return not self.diff


def diff(config: Config, nft: Nft, *, after_stop: bool = False) -> Drift:
    """Compare the live table with what `config` renders, both in nft's normal form.

    after_stop: with what a clean stop of `run` leaves (containment alone, or nothing).
    """
    backend, _ = backend_for(config, nft)
    rs = model.build(config, backend.name)
    text = render.render_after_stop(rs) if after_stop else render.render(rs)
    want = _comparable(scratch.run("normalize", text, rs.table)) if text else ""
    live_text = nft.list_tables(rs.table)
    have = _comparable(live_text or "")
    expected_xt = [] if after_stop else backend.expected(rs)
    want_lines = want.splitlines(keepends=True) + [f"# xt: {r}\n" for r in expected_xt]
    have_lines = have.splitlines(keepends=True) + [f"# xt: {r}\n" for r in _installed_xt(rs.table, nft)]
    return Drift(backend.name, "".join(difflib.unified_diff(have_lines, want_lines, "live", "rendered")),
                 missing_table=live_text is None or not live_text.startswith("table inet "))


def _installed_xt(table: str, nft: Nft) -> list[str]:
    return backends.XtQueue(nft).installed(table)


@dataclass(frozen=True)
class ChainStatus:
    name: str
    hook: str
    priority: int
    packets: int


@dataclass(frozen=True)
class Status:
    table: str
    loaded: bool
    backend: str = ""
    chains: tuple[ChainStatus, ...] = ()
    xt_rules: tuple[str, ...] = ()
    sets: dict[str, int] = field(default_factory=dict)
    # protocol -> new conversations admission control dropped before the queue
    admission: dict[str, int] = field(default_factory=dict)
    # packets from sources their interface does not route to (None: no such counter)
    spoofed: int | None = None

    @property
    def contained(self) -> bool:
        """Only the containment chain: what a clean stop leaves (no worker, nothing diverted)."""
        names = {c.name for c in self.chains}
        return "contain" in names and not names & {"answer_for_all", "answer_for_self"}

    @property
    def kernel_path(self) -> bool:
        """The dstnat rules redirect to the default listeners themselves; nothing is queued."""
        return bool({c.name for c in self.chains} & {"redirect_from_clients", "redirect_from_self"})


def status(table: str, nft: Nft) -> Status:
    objects = nft.table_objects(table)
    if not objects:
        return Status(table, loaded=False, xt_rules=tuple(_installed_xt(table, nft)))
    objects += nft.table_objects(table, "bridge")  # gateway mode's: its chains' names are its own
    chains: dict[str, dict] = {o["chain"]["name"]: o["chain"] for o in objects if "chain" in o}
    packets: dict[str, int] = dict.fromkeys(chains, 0)
    queued_natively = False
    for o in objects:
        rule = o.get("rule")
        if not rule:
            continue
        for expr in rule["expr"]:
            if isinstance(expr.get("counter"), dict):  # a named one is {"counter": "name"}: counted below
                packets[rule["chain"]] += expr["counter"]["packets"]
            queued_natively |= "queue" in expr
    sets = {s["name"]: len(s.get("elem", [])) for o in objects if (s := o.get("set") or o.get("map"))}
    xt = tuple(_installed_xt(table, nft))
    return Status(
        table, loaded=True, backend=NATIVE_QUEUE if queued_natively else (XT_QUEUE if xt else model.NO_BACKEND),
        chains=tuple(ChainStatus(n, c.get("hook", "-"), c.get("prio", 0), packets[n])
                     for n, c in chains.items()),
        xt_rules=xt, sets=sets, admission=_named_counters(objects, "admission_"),
        spoofed=_named_counters(objects, SPOOFED).get(""))


def _named_counters(objects: list[dict], prefix: str) -> dict[str, int]:
    return {o["counter"]["name"][len(prefix):]: o["counter"]["packets"]
            for o in objects if "counter" in o and o["counter"]["name"].startswith(prefix)}


def _counters(table: str, nft: Nft, prefix: str) -> dict[str, int]:
    return _named_counters(nft.json_cmd({"list": {"counters": {"family": "inet", "table": table}}}), prefix)


def admission_drops(table: str, nft: Nft) -> dict[str, int]:
    """protocol -> new conversations dropped by admission control so far ({} without the table)."""
    return _counters(table, nft, "admission_")


def spoofed(table: str, nft: Nft) -> dict[str, int]:
    """{"spoofed": packets dropped for a source their interface does not route to}; {} without it."""
    return {SPOOFED: n for n in _counters(table, nft, SPOOFED).values()}


def diverted(table: str, nft: Nft) -> dict[str, int]:
    """Kernel path: protocol -> new conversations its rules redirected to the default listener."""
    return _counters(table, nft, "diverted_")
