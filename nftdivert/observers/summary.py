"""What was contacted: the table printed when `run` or `sandbox` stops, and its JSON (pure).

One row per destination (name, address, port, protocol), with the number of
conversations and the bytes both ways, built from the log's start and end
records.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from nftdivert.observers.convrecords import split_endpoint


@dataclass
class Row:
    name: str
    address: str
    port: int | None
    protocol: str
    conversations: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class Summary:
    rows: dict[tuple, Row] = field(default_factory=dict)
    _started: set[int] = field(default_factory=set)
    # (client address, protocol) -> new conversations admission control dropped
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)

    def _row(self, rec: dict) -> Row:
        addr, port = split_endpoint(rec["original_destination"])
        key = (rec.get("name", ""), addr, port, rec["protocol"])
        if key not in self.rows:
            self.rows[key] = Row(*key)
        return self.rows[key]

    def add(self, rec: dict) -> None:
        """Count one log record (other events than start and end are ignored)."""
        event = rec.get("event")
        if event == "admission":
            key = (rec["client_address"], rec["protocol"])
            self.dropped[key] = self.dropped.get(key, 0) + rec["dropped"]
        elif event == "start":
            self._started.add(rec["id"])
            self._row(rec).conversations += 1
        elif event == "end":
            row = self._row(rec)
            if rec["id"] in self._started:
                self._started.discard(rec["id"])
            else:
                row.conversations += 1  # its start record was lost
            row.bytes_sent += (rec.get("sent") or {}).get("bytes", 0)
            row.bytes_received += (rec.get("received") or {}).get("bytes", 0)

    def sorted_rows(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda r: (r.name or "~", r.address, r.port or 0, r.protocol))

    def as_json(self) -> str:
        return json.dumps({"v": 1, "contacted": [
            {"name": r.name or None, "address": r.address, "port": r.port, "protocol": r.protocol,
             "conversations": r.conversations, "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received}
            for r in self.sorted_rows()], **self._dropped_json()}, indent=1) + "\n"

    def _dropped_json(self) -> dict:
        if not self.dropped:
            return {}
        return {"admission_dropped": [{"client_address": c, "protocol": p, "dropped": n}
                                      for (c, p), n in sorted(self.dropped.items())]}

    def table(self) -> str:
        head = ("name", "address", "port", "proto", "conv", "sent", "received")
        rows = [(r.name or "-", r.address, "-" if r.port is None else str(r.port), r.protocol,
                 str(r.conversations), str(r.bytes_sent), str(r.bytes_received)) for r in self.sorted_rows()]
        if not rows:
            return "contacted: nothing\n" + self._dropped_table()
        widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in (head, *rows)]
        return "contacted:\n" + "\n".join("  " + line.rstrip() for line in lines) + "\n" + self._dropped_table()

    def _dropped_table(self) -> str:
        """New conversations admission control dropped, per client (the log's `admission` records say where to)."""
        if not self.dropped:
            return ""
        return "dropped by admission control (new conversations):\n" + "".join(
            f"  {client}  {proto}  {n}\n" for (client, proto), n in sorted(self.dropped.items()))
