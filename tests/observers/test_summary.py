"""The table of what was contacted, per client, from start and end records (pure)."""

from __future__ import annotations

import json
import time
import tracemalloc

from nftdivert.observers import summary as summary_mod
from nftdivert.observers.summary import Summary

CLIENT = "192.0.2.2"


def _start(i: int, dest: str, protocol: str = "tcp", name: str | None = None, client: str = CLIENT) -> dict:
    port = "" if protocol.startswith("icmp") else ":40000"
    shown = f"[{client}]{port}" if ":" in client and port else f"{client}{port}"
    rec = {"event": "start", "id": i, "protocol": protocol, "client": shown, "client_address": client,
           "original_destination": dest, "listener": "tcp-echo"}
    return {**rec, "name": name} if name else rec


def _end(i: int, dest: str, sent: int, received: int, protocol: str = "tcp", name: str | None = None,
         client: str = CLIENT, started: bool = True) -> dict:
    rec = {**_start(i, dest, protocol, name, client), "event": "end",
           "sent": {"packets": 1, "bytes": sent}, "received": {"packets": 1, "bytes": received}}
    if not started:  # the observer never saw its start: the end carries no listener
        del rec["listener"]
    return rec


def _row(name, address, port, protocol, conversations, sent, received) -> dict:
    return {"name": name, "address": address, "port": port, "protocol": protocol, "conversations": conversations,
            "bytes_sent": sent, "bytes_received": received}


def test_rows_per_client_and_destination_with_conversations_and_bytes():
    s = Summary()
    for rec in (_start(1, "198.18.0.1:443", name="c2.example"), _start(2, "198.18.0.1:443", name="c2.example"),
                _end(1, "198.18.0.1:443", 100, 1000, name="c2.example"), {"event": "dns", "name": "c2.example"},
                _end(2, "198.18.0.1:443", 50, 500, name="c2.example"), _start(3, "[2001:db8::53]:53", "udp"),
                _end(3, "[2001:db8::53]:53", 70, 90, "udp"),
                _end(4, "198.51.100.9", 84, 84, "icmp", started=False),
                _start(5, "198.51.100.9", "icmp", client="2001:db8:1::2"),
                _end(5, "198.51.100.9", 84, 84, "icmp", client="2001:db8:1::2")):
        s.add(rec)
    doc = json.loads(s.as_json())
    assert doc == {"v": 2, "group_by": ["client_address"], "groups": [
        {"client_address": CLIENT, "conversations": 4, "bytes_sent": 304, "bytes_received": 1674, "contacted": [
            _row("c2.example", "198.18.0.1", 443, "tcp", 2, 150, 1500),
            _row(None, "198.51.100.9", None, "icmp", 1, 84, 84),
            _row(None, "2001:db8::53", 53, "udp", 1, 70, 90)],
         "more": {"destinations": 0, "conversations": 0, "bytes_sent": 0, "bytes_received": 0}},
        {"client_address": "2001:db8:1::2", "conversations": 1, "bytes_sent": 84, "bytes_received": 84,
         "contacted": [_row(None, "198.51.100.9", None, "icmp", 1, 84, 84)],
         "more": {"destinations": 0, "conversations": 0, "bytes_sent": 0, "bytes_received": 0}}],
        "total": {"conversations": 5, "bytes_sent": 388, "bytes_received": 1758}}
    table = s.table().splitlines()
    assert table[0] == "contacted:" and table[1].split() == ["client", "name", "address", "port", "proto", "conv",
                                                            "sent", "received"]
    assert table[2].split() == [CLIENT, "c2.example", "198.18.0.1", "443", "tcp", "2", "150", "1500"]
    assert table[3].split() == [CLIENT, "-", "198.51.100.9", "-", "icmp", "1", "84", "84"]
    assert table[5].split() == ["2001:db8:1::2", "-", "198.51.100.9", "-", "icmp", "1", "84", "84"]
    assert table[6].split() == ["total", "5", "388", "1758"] and len(table) == 7


def test_an_end_without_counters_or_start_still_counts_once():
    s = Summary()
    s.add({**_end(9, "198.51.100.1:80", 0, 0, started=False), "sent": None, "received": None})
    s.add(_start(10, "198.51.100.1:80"))
    s.add({**_end(10, "198.51.100.1:80", 0, 0), "sent": None, "received": None})
    ((_dest, row),) = s.groups[(CLIENT,)].sorted_rows()
    assert (row.conversations, row.bytes_sent) == (2, 0)


def test_a_record_without_client_address_is_grouped_by_its_client():
    s = Summary()
    s.add({k: v for k, v in _start(1, "198.51.100.1:80", client="2001:db8:1::2").items() if k != "client_address"})
    assert list(s.groups) == [("2001:db8:1::2",)]


def test_nothing_contacted():
    assert Summary().table() == "contacted: nothing\n"
    assert json.loads(Summary().as_json()) == {"v": 2, "group_by": ["client_address"], "groups": [],
                                               "total": {"conversations": 0, "bytes_sent": 0, "bytes_received": 0}}


def _flood(s: Summary, n: int, client: str = CLIENT, first: int = 0) -> None:
    """n UDP conversations (start and end) to n distinct destinations, as a flood to random addresses makes."""
    for i in range(first, first + n):
        dest = f"198.18.{i >> 8 & 255}.{i & 255}:{1024 + (i >> 16)}"
        s.add(_start(i, dest, "udp", client=client))
        s.add(_end(i, dest, 40, 0, "udp", client=client))


def test_100k_distinct_destinations_stay_bounded_in_rows_memory_and_time():
    s = Summary()
    s.add(_start(-1, "198.51.100.80:443"))  # the busy one: it must stay a row of its own
    for i in range(5):
        s.add(_start(-2 - i, "198.51.100.80:443"))
    tracemalloc.start()
    t0 = time.monotonic()
    _flood(s, 10_000)
    ten_k = tracemalloc.get_traced_memory()[0]
    _flood(s, 90_000, first=10_000)
    grown = tracemalloc.get_traced_memory()[0] - ten_k
    table, doc = s.table(), json.loads(s.as_json())
    took = time.monotonic() - t0
    tracemalloc.stop()
    assert s.rows <= summary_mod.ROWS_KEPT
    assert grown < 1_000_000, f"memory grew {grown} bytes from 10k to 100k destinations"
    assert took < 20, took  # 100k start and end records, and both reports
    (group,) = doc["groups"]
    assert group["conversations"] == doc["total"]["conversations"] == 100_006
    assert doc["total"]["bytes_sent"] == 4_000_000
    assert group["contacted"][0] == _row(None, "198.51.100.80", 443, "tcp", 6, 0, 0)
    assert len(group["contacted"]) <= summary_mod.ROWS_KEPT
    more = group["more"]
    assert more["conversations"] + sum(r["conversations"] for r in group["contacted"]) == 100_006
    assert more["destinations"] + len(group["contacted"]) == 100_001
    lines = table.splitlines()
    assert len(lines) == 2 + summary_mod.ROWS_SHOWN + 2, lines[-5:]
    assert lines[-2].split()[:4] == [CLIENT, "(99981", "more", "destinations)"], lines[-2]
    assert lines[-1].split() == ["total", "100006", "4000000", "0"]


def test_clients_are_bounded_too_and_the_quietest_are_folded():
    s = Summary(groups_kept=4)
    for c in range(10):
        _flood(s, 1 + c, client=f"192.0.2.{10 + c}")  # the later, the busier
    assert len(s.groups) <= 5 and s.total().conversations == sum(range(1, 11))
    doc = json.loads(s.as_json())
    assert doc["groups"][-1]["client_address"] is None  # the other clients, last
    assert doc["groups"][-2]["client_address"] == "192.0.2.19" and doc["groups"][-2]["conversations"] == 10
    assert sum(g["conversations"] for g in doc["groups"]) == 55


def test_the_table_shows_the_first_clients_and_counts_the_rest():
    s = Summary()
    for c in range(summary_mod.GROUPS_SHOWN + 3):
        _flood(s, 1, client=f"192.0.2.{10 + c}")
    lines = s.table().splitlines()
    assert lines[-2].split() == ["(3", "more", "clients)", "3", "120", "0"], lines[-2]
    assert lines[-1].split() == ["total", str(summary_mod.GROUPS_SHOWN + 3), "520", "0"]
    assert len(lines) == 2 + summary_mod.GROUPS_SHOWN + 2


def test_an_end_whose_row_was_folded_adds_its_bytes_to_more():
    s = Summary(rows_kept=4)
    for i in range(6):
        s.add(_start(i, f"198.51.100.{i}:80"))
    for i in range(6):
        s.add(_end(i, f"198.51.100.{i}:80", 10, 20))
    (group,) = json.loads(s.as_json())["groups"]
    assert group["conversations"] == 6 and group["bytes_sent"] == 60
    assert sum(r["conversations"] for r in group["contacted"]) + group["more"]["conversations"] == 6
    assert sum(r["bytes_sent"] for r in group["contacted"]) + group["more"]["bytes_sent"] == 60


def test_grouped_by_task_a_reused_address_is_two_groups_and_no_task_is_its_own():
    s = Summary(("client_address", "task"))
    for task in ("4711", None, "4712"):
        rec = {**_start(1, "198.51.100.9:80"), **({"task": task} if task else {})}
        s.add(rec)
    doc = json.loads(s.as_json())
    assert doc["group_by"] == ["client_address", "task"]
    assert [(g["client_address"], g["task"], g["conversations"]) for g in doc["groups"]] == [
        (CLIENT, None, 1), (CLIENT, "4711", 1), (CLIENT, "4712", 1)]
    clients = [line.split()[:2] for line in s.table().splitlines()[2:5]]
    assert clients == [[CLIENT, "-"], [CLIENT, "4711"], [CLIENT, "4712"]]
