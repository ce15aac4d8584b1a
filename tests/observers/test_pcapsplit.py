"""The capture's split per analysis: each task's pcap gets its clients' packets, by the packet's time."""
from __future__ import annotations

import ipaddress
import struct

from nftdivert import tasks
from nftdivert.observers import pcap
from nftdivert.observers.pcapsplit import TaskSplit, addresses


def ipv4(src: str, dst: str) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    return header


def ipv6(src: str, dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 0, 59, 64, ipaddress.ip_address(src).packed,
                       ipaddress.ip_address(dst).packed)


def records(path) -> list[tuple[float, bytes]]:
    data = path.read_bytes()
    at, out = pcap.FILE_HEADER.size, []
    while at < len(data):
        sec, usec, caplen, _ = pcap.RECORD_HEADER.unpack_from(data, at)
        at += pcap.RECORD_HEADER.size
        out.append((sec + usec / 1e6, data[at:at + caplen]))
        at += caplen
    return out


class Replies(list):
    send = list.append


def test_each_task_gets_its_clients_packets_both_ways_and_only_while_it_owns_them(tmp_path):
    net = ipaddress.ip_network
    table = (tasks.TaskTable().started("a", (net("192.0.2.10/32"),), 100.0).ended("a", 200.0)
             .started("b", (net("192.0.2.11/32"), net("2001:db8:1::/64")), 100.0))
    split, replies = TaskSplit(), Replies()
    split.handle(("open", "a", str(tmp_path / "a.pcap")), replies)
    split.handle(("open", "b", str(tmp_path / "b.pcap")), replies)
    split.handle(("table", table), replies)
    out, back, other = ipv4("192.0.2.10", "198.51.100.1"), ipv4("198.51.100.1", "192.0.2.10"), ipv4("192.0.2.12", "198.51.100.1")
    six, between = ipv6("2001:db8:1::7", "2001:db8:ffff::1"), ipv4("192.0.2.10", "192.0.2.11")
    split.write([(out, 99.0), (out, 150.0), (back, 150.5), (other, 151.0), (six, 152.0), (between, 153.0),
                 (b"\x45", 154.0), (out, 250.0)])
    split.handle(("close", "a"), replies)
    split.handle(("close", "b"), replies)
    assert replies == [("closed", "a", 3), ("closed", "b", 2)]
    assert records(tmp_path / "a.pcap") == [(150.0, out), (150.5, back), (153.0, between)]
    assert records(tmp_path / "b.pcap") == [(152.0, six), (153.0, between)]
    assert addresses(b"\x45") is None and addresses(b"") is None


def test_a_table_change_is_seen_by_addresses_looked_up_before(tmp_path):
    split, replies = TaskSplit(), Replies()
    split.handle(("open", "a", str(tmp_path / "a.pcap")), replies)
    packet = ipv4("192.0.2.10", "198.51.100.1")
    split.write([(packet, 10.0)])  # nobody's yet: the address's (empty) intervals are remembered
    table = tasks.TaskTable().started("a", (ipaddress.ip_network("192.0.2.10/32"),), 5.0)
    split.handle(("table", table), replies)
    split.write([(packet, 11.0)])
    split.handle(("close", "a"), replies)
    assert records(tmp_path / "a.pcap") == [(11.0, packet)]
