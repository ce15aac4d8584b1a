"""What was contacted, per client: the table printed when `run` or `sandbox` stops, and its JSON (pure).

Built from the log's start and end records: per client address, one row per
destination (name, address, port, protocol) with the number of conversations
and the bytes both ways. Memory is bounded whatever a sample does (a UDP
flood to random addresses makes a destination per datagram): at most
ROWS_KEPT rows and GROUPS_KEPT clients are kept. Beyond that the rows with
the fewest conversations are folded into their client's `more` counts, and
the quietest clients into one group of other clients, so every total stays
exact. The table shows the busiest rows of the first clients only. The
new conversations admission control dropped are counted per client and
protocol beside them (the log's `admission` records say where they went).
"""
from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field

from nftdivert.observers.convrecords import has_start, split_endpoint

GROUP_BY = ("client_address",)  # the fields a group is keyed by
BY_TASK = ("client_address", "task")  # with analyses: a client's conversations of each task apart
ROWS_KEPT = 4096  # rows in memory, all clients together
GROUPS_KEPT = 256
ROWS_SHOWN = 20  # per client, in the table
GROUPS_SHOWN = 10
OTHERS = None  # the key of the group the quietest clients are folded into


@dataclass
class Counts:
    conversations: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, other: Counts) -> None:
        self.conversations += other.conversations
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received

    def weight(self) -> tuple[int, int]:
        return self.conversations, self.bytes_sent + self.bytes_received

    def as_dict(self) -> dict:
        return {"conversations": self.conversations, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received}


@dataclass
class Group:
    """One client's (one key's) destinations: the rows kept, and what was folded out of them."""

    key: tuple | None
    total: Counts = field(default_factory=Counts)
    rows: dict[tuple, Counts] = field(default_factory=dict)  # (name, address, port, protocol) -> counts
    more: Counts = field(default_factory=Counts)
    more_rows: int = 0  # destinations folded into `more` (one folded twice counts twice)
    dropped: dict[str, int] = field(default_factory=dict)  # protocol -> new conversations admission dropped

    def add_dropped(self, dropped: dict[str, int]) -> None:
        for proto, n in dropped.items():
            self.dropped[proto] = self.dropped.get(proto, 0) + n

    def fold(self, dest: tuple) -> None:
        self.more.add(self.rows.pop(dest))
        self.more_rows += 1

    def sorted_rows(self) -> list[tuple[tuple, Counts]]:
        """Busiest first."""
        return sorted(self.rows.items(), key=lambda kv: (_negated(kv[1].weight()), kv[0][0] or "~", kv[0][1],
                                                         kv[0][2] or 0, kv[0][3]))


def _negated(weight: tuple[int, int]) -> tuple[int, int]:
    return -weight[0], -weight[1]


def _client_address(rec: dict) -> str:
    return rec.get("client_address") or split_endpoint(rec.get("client", ""))[0]


def _order(key: tuple | None) -> tuple:
    """Groups in address order (IPv4 first), the other clients last."""
    if key is None:
        return (2,)
    try:
        ip = ipaddress.ip_address(key[0])
        return 0, ip.version, int(ip), _comparable(key[1:])
    except ValueError:
        return 1, _comparable(key)


def _comparable(key: tuple) -> tuple:
    """A key whose parts may be missing (a client's conversations of no task): None first."""
    return tuple(("",) if k is None else (str(k),) for k in key)


def _label(key: tuple | None) -> str:
    return "other clients" if key is OTHERS else " ".join(str(k) for k in key if k is not None)


class Summary:
    def __init__(self, group_by: tuple[str, ...] = GROUP_BY, rows_kept: int = ROWS_KEPT,
                 groups_kept: int = GROUPS_KEPT) -> None:
        self.group_by = group_by
        self._rows_kept, self._groups_kept = rows_kept, groups_kept
        self.groups: dict[tuple | None, Group] = {}
        self.rows = 0  # kept, all groups together

    def _key(self, rec: dict) -> tuple:
        return tuple(_client_address(rec) if k == "client_address" else rec.get(k) for k in self.group_by)

    def add(self, rec: dict) -> None:
        """Count one log record (other events than start, end and admission are ignored)."""
        event = rec.get("event")
        if event == "admission":
            key = self._key(rec)
            group = self.groups.get(key) or self._new_group(key)
            group.add_dropped({rec["protocol"]: rec["dropped"]})
            return
        if event not in ("start", "end"):
            return
        addr, port = split_endpoint(rec["original_destination"])
        dest = (rec.get("name", ""), addr, port, rec["protocol"])
        # An end whose start was counted adds its bytes; one whose start was lost counts its conversation too.
        counted = event == "end" and has_start(rec)
        key = self._key(rec)
        if counted and key not in self.groups:
            key = OTHERS  # its client was folded since its start
        group = self.groups.get(key) or self._new_group(key)
        counts = Counts(0 if counted else 1)
        if event == "end":
            counts.bytes_sent = (rec.get("sent") or {}).get("bytes", 0)
            counts.bytes_received = (rec.get("received") or {}).get("bytes", 0)
        group.total.add(counts)
        row = group.rows.get(dest)
        if row is None and (counted or key is OTHERS):
            group.more.add(counts)  # its row was folded since its start
            return
        if row is None:
            row = group.rows[dest] = Counts()
            self.rows += 1
        row.add(counts)
        if self.rows > self._rows_kept:
            self._fold_rows()

    def _new_group(self, key: tuple | None) -> Group:
        if key is not OTHERS and len(self.groups) - (OTHERS in self.groups) >= self._groups_kept:
            self._fold_groups()
        group = self.groups[key] = Group(key)
        return group

    def _fold_rows(self) -> None:
        """Fold the lower half of all rows: the fewest conversations (then bytes) first, the newest among equals."""
        ranked = [(counts.weight(), group, dest) for group in self.groups.values()
                  for dest, counts in group.rows.items()]
        ranked.reverse()  # the sort is stable: among equals, the newest (last in) comes first
        ranked.sort(key=lambda r: r[0])
        half = len(ranked) // 2
        for _weight, group, dest in ranked[:half]:
            group.fold(dest)
        self.rows -= half

    def _fold_groups(self) -> None:
        """Fold the quieter half of the clients into the other clients' group."""
        others = self.groups.setdefault(OTHERS, Group(OTHERS))
        ranked = sorted((g for g in self.groups.values() if g.key is not OTHERS), key=lambda g: g.total.weight())
        for group in ranked[:max(1, len(ranked) // 2)]:
            del self.groups[group.key]
            others.total.add(group.total)
            others.more.add(group.more)
            others.more_rows += group.more_rows
            others.add_dropped(group.dropped)
            for counts in group.rows.values():
                others.more.add(counts)
                others.more_rows += 1
            self.rows -= len(group.rows)

    def total(self) -> Counts:
        total = Counts()
        for group in self.groups.values():
            total.add(group.total)
        return total

    def dropped(self) -> dict[str, int]:
        """New conversations admission control dropped, per protocol, all clients together."""
        total = Group(OTHERS)
        for group in self.groups.values():
            total.add_dropped(group.dropped)
        return total.dropped

    def sorted_groups(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: _order(g.key))

    def as_json(self) -> str:
        groups = []
        for g in self.sorted_groups():
            named = dict(zip(self.group_by, g.key or (None,) * len(self.group_by)))
            groups.append({**named, **g.total.as_dict(), "contacted": [
                {"name": name or None, "address": addr, "port": port, "protocol": proto, **c.as_dict()}
                for (name, addr, port, proto), c in g.sorted_rows()],
                "more": {"destinations": g.more_rows, **g.more.as_dict()},
                **({"admission_dropped": dict(sorted(g.dropped.items()))} if g.dropped else {})})
        dropped = self.dropped()
        return json.dumps({"v": 2, "group_by": list(self.group_by), "groups": groups,
                           "total": {**self.total().as_dict(),
                                     **({"admission_dropped": dict(sorted(dropped.items()))} if dropped else {})}},
                          indent=1) + "\n"

    def table(self) -> str:
        if not self.groups:
            return "contacted: nothing\n"
        head = ("client", "name", "address", "port", "proto", "conv", "sent", "received")
        lines: list[tuple] = []
        shown = self.sorted_groups()
        hidden = Counts()
        hidden_groups = 0
        if len(shown) > GROUPS_SHOWN:
            for g in shown[GROUPS_SHOWN:]:
                hidden.add(g.total)
                hidden_groups += 1
            shown = shown[:GROUPS_SHOWN]
        for g in shown:
            client = _label(g.key)
            rows = g.sorted_rows()
            for (name, addr, port, proto), c in rows[:ROWS_SHOWN]:
                lines.append((client, name or "-", addr, "-" if port is None else str(port), proto, *_cells(c)))
            more, n = Counts(), g.more_rows
            more.add(g.more)
            for _dest, c in rows[ROWS_SHOWN:]:
                more.add(c)
                n += 1
            if n or more.conversations:
                lines.append((client, f"({n} more destinations)", "", "", "", *_cells(more)))
        if hidden_groups:
            lines.append((f"({hidden_groups} more clients)", "", "", "", "", *_cells(hidden)))
        lines.append(("total", "", "", "", "", *_cells(self.total())))
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
        out = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
               for row in (head, *lines)]
        return "contacted:\n" + "\n".join("  " + line.rstrip() for line in out) + "\n" + self._dropped_table()

    def _dropped_table(self) -> str:
        """New conversations admission control dropped, per client and protocol."""
        lines = [f"  {_label(g.key)}  {proto}  {n}\n"
                 for g in self.sorted_groups() for proto, n in sorted(g.dropped.items())]
        if not lines:
            return ""
        return "dropped by admission control (new conversations):\n" + "".join(lines[:GROUPS_SHOWN * 2]) + (
            f"  ({len(lines) - GROUPS_SHOWN * 2} more)\n" if len(lines) > GROUPS_SHOWN * 2 else "")


def _cells(c: Counts) -> tuple[str, str, str]:
    return str(c.conversations), str(c.bytes_sent), str(c.bytes_received)
