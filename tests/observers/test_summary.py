"""The table of what was contacted, from start and end records (pure)."""

from __future__ import annotations

import json

from nftdivert.observers.summary import Summary


def _start(i: int, dest: str, protocol: str = "tcp", name: str | None = None) -> dict:
    rec = {"event": "start", "id": i, "protocol": protocol, "original_destination": dest}
    return {**rec, "name": name} if name else rec


def _end(i: int, dest: str, sent: int, received: int, protocol: str = "tcp", name: str | None = None) -> dict:
    return {**_start(i, dest, protocol, name), "event": "end",
            "sent": {"packets": 1, "bytes": sent}, "received": {"packets": 1, "bytes": received}}


def test_rows_per_destination_with_conversations_and_bytes():
    s = Summary()
    for rec in (_start(1, "198.18.0.1:443", name="c2.example"), _start(2, "198.18.0.1:443", name="c2.example"),
                _end(1, "198.18.0.1:443", 100, 1000, name="c2.example"), {"event": "dns", "name": "c2.example"},
                _end(2, "198.18.0.1:443", 50, 500, name="c2.example"), _start(3, "[2001:db8::53]:53", "udp"),
                _end(3, "[2001:db8::53]:53", 70, 90, "udp"), _end(4, "198.51.100.9", 84, 84, "icmp")):
        s.add(rec)
    doc = json.loads(s.as_json())
    assert doc == {"v": 1, "contacted": [
        {"name": "c2.example", "address": "198.18.0.1", "port": 443, "protocol": "tcp", "conversations": 2,
         "bytes_sent": 150, "bytes_received": 1500},
        {"name": None, "address": "198.51.100.9", "port": None, "protocol": "icmp", "conversations": 1,
         "bytes_sent": 84, "bytes_received": 84},
        {"name": None, "address": "2001:db8::53", "port": 53, "protocol": "udp", "conversations": 1,
         "bytes_sent": 70, "bytes_received": 90}]}
    table = s.table().splitlines()
    assert table[0] == "contacted:" and table[1].split() == ["name", "address", "port", "proto", "conv", "sent",
                                                            "received"]
    assert table[2].split() == ["c2.example", "198.18.0.1", "443", "tcp", "2", "150", "1500"]
    assert table[3].split() == ["-", "198.51.100.9", "-", "icmp", "1", "84", "84"]


def test_an_end_without_counters_or_start_still_counts_once():
    s = Summary()
    s.add({**_end(9, "198.51.100.1:80", 0, 0), "sent": None, "received": None})
    (row,) = s.sorted_rows()
    assert (row.conversations, row.bytes_sent) == (1, 0)


def test_nothing_contacted():
    assert Summary().table() == "contacted: nothing\n"
    assert json.loads(Summary().as_json()) == {"v": 1, "contacted": []}
