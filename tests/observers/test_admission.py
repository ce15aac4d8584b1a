"""What admission control dropped, as records: one per client and protocol a second (pure)."""

from __future__ import annotations

from builders import V4_CLIENT, V4_LOCAL, V6_CLIENT, V6_LOCAL, packet

from nftdivert.observers import admission
from nftdivert.observers.admission import Tally
from nftdivert.observers.convlog import text_line
from nftdivert.observers.summary import Summary
from nftdivert.worker.packet import TCP, UDP


def test_a_dropped_packet_names_its_client_and_the_destination_it_asked_for():
    assert admission.parse_drop(packet(4, TCP, V4_CLIENT, V4_LOCAL, 40000, 8080)[:admission.HEADERS]) == (
        "tcp", "198.51.100.7", "203.0.113.1:8080")
    assert admission.parse_drop(packet(6, UDP, V6_CLIENT, V6_LOCAL, 40000, 53, b"x" * 500)[:admission.HEADERS]) == (
        "udp", "2001:db8::7", "[2001:db8:1::1]:53")
    assert admission.parse_drop(b"\x45\x00") is None


def test_one_record_per_client_and_protocol_a_second_with_every_destination_once():
    t = Tally()
    for i, port in enumerate([1, 2, 2, 3]):
        t.add(100.0 + i * 0.1, "tcp", "192.0.2.2", f"198.51.100.30:{port}")
    t.add(100.2, "udp", "192.0.2.2", "198.51.100.30:53")
    t.add(100.5, "tcp", "192.0.2.3", "198.51.100.30:9")
    assert t.due(100.9) == [] and t.next_due() == 101.0
    (first, when), (udp, _) = t.due(101.2)
    assert when == 100.0 and first == {
        "v": 1, "time": "1970-01-01T00:01:40.000Z", "event": "admission", "protocol": "tcp",
        "client_address": "192.0.2.2", "dropped": 4, "destinations": 3,
        "original_destinations": ["198.51.100.30:1", "198.51.100.30:2", "198.51.100.30:3"]}
    assert (udp["protocol"], udp["dropped"], udp["original_destinations"]) == ("udp", 1, ["198.51.100.30:53"])
    t.add(101.3, "tcp", "192.0.2.2", "198.51.100.30:4")  # a new second: a new record
    assert [r["client_address"] for r, _ in t.rest()] == ["192.0.2.3", "192.0.2.2"] and t.windows == {}


def test_a_flood_is_counted_whole_but_named_only_so_far():
    t = Tally()
    for port in range(admission.SHOWN + 10):
        t.add(5.0, "tcp", "192.0.2.2", f"198.51.100.30:{port}")
    ((rec, _),) = t.rest()
    assert rec["dropped"] == rec["destinations"] == admission.SHOWN + 10
    assert len(rec["original_destinations"]) == admission.SHOWN


def test_clients_beyond_the_bound_are_counted_not_recorded(monkeypatch):
    monkeypatch.setattr(admission, "CLIENTS_MAX", 2)
    t = Tally()
    for client in ("192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.4"):
        t.add(5.0, "tcp", client, "198.51.100.30:1")
    assert len(t.rest()) == 2 and t.unrecorded == 2


def test_the_record_reads_as_one_line_and_the_summary_counts_drops_per_client():
    t = Tally()
    for port in range(1, 4):
        t.add(5.0, "tcp", "192.0.2.2", f"198.51.100.30:{port}")
    ((rec, _),) = t.rest()
    assert text_line(rec) == ("00:00:05.000  admission dropped 3 new tcp from 192.0.2.2 to 3 destinations: "
                              "198.51.100.30:1 198.51.100.30:2 198.51.100.30:3")
    summary = Summary()
    summary.add(rec)
    summary.add({**rec, "dropped": 2})
    assert summary.table().endswith("dropped by admission control (new conversations):\n  192.0.2.2  tcp  5\n")
    assert '"admission_dropped"' in summary.as_json() and '"tcp": 5' in summary.as_json()
