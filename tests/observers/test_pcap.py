"""The capture file, checked by what real readers make of it: tcpdump, tshark."""
from __future__ import annotations

import ipaddress
import os
import stat
import struct
import subprocess
import threading

import pytest

from builders import packet
from nftdivert.observers import pcap
from nftdivert.worker.packet import TCP, UDP
from nftdivert.observers.pcap import PcapWriter


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


T0 = 1_700_000_000.25

# (packet, timestamp, what tcpdump -nn prints for it, tshark fields)
CASES = [
    (packet(4, TCP, ip("192.0.2.2"), ip("198.51.100.7"), 40000, 45678), T0,
     "IP 192.0.2.2.40000 > 198.51.100.7.45678: Flags [S]", ["198.51.100.7", "", "45678", ""]),
    (packet(6, TCP, ip("2001:db8:1::2"), ip("2001:db8:ffff::7"), 40001, 45678, b"hi"), T0 + 0.5,
     "IP6 2001:db8:1::2.40001 > 2001:db8:ffff::7.45678: Flags [S]", ["", "2001:db8:ffff::7", "45678", ""]),
    (packet(4, UDP, ip("192.0.2.2"), ip("203.0.113.9"), 40002, 5353, b"\0" * 12), T0 + 1.000001,
     "IP 192.0.2.2.40002 > 203.0.113.9.5353: ", ["203.0.113.9", "", "", "5353"]),
    (packet(6, UDP, ip("2001:db8:1::2"), ip("2001:db8:ffff::9"), 40003, 9999, b"x" * 100), T0 + 2.999999,
     "IP6 2001:db8:1::2.40003 > 2001:db8:ffff::9.9999: UDP, length 100", ["", "2001:db8:ffff::9", "", "9999"]),
]


def read_records(path) -> tuple[tuple, list[tuple[int, int, int, bytes]]]:
    """Independent reader: (file header fields, [(sec, usec, orig_len, data)])."""
    data = open(path, "rb").read()
    magic = struct.unpack_from("<I", data)[0]
    order = "<" if magic == 0xA1B2C3D4 else ">"
    header = struct.unpack_from(order + "IHHiIII", data)
    records, offset = [], 24
    while offset < len(data):
        sec, usec, incl, orig = struct.unpack_from(order + "IIII", data, offset)
        offset += 16
        records.append((sec, usec, orig, data[offset : offset + incl]))
        assert len(records[-1][3]) == incl
        offset += incl
    return header, records


@pytest.fixture
def capture(tmp_path):
    path = tmp_path / "divert.pcap"
    with PcapWriter(path) as writer:
        for pkt, ts, _, _ in CASES:
            writer.write(pkt, ts)
    return path


def test_header_and_records(capture):
    header, records = read_records(capture)
    assert header == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
    assert [r[3] for r in records] == [c[0] for c in CASES]
    assert [(r[0], r[1]) for r in records] == [(1_700_000_000, 250_000), (1_700_000_000, 750_000),
                                               (1_700_000_001, 250_001), (1_700_000_003, 249_999)]


def test_tcpdump_reads_it(capture):
    proc = subprocess.run(["tcpdump", "-r", str(capture), "-nn", "-tt"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(CASES), proc.stdout
    for line, (_, ts, expected, _) in zip(lines, CASES):
        assert expected in line, line
        assert line.startswith(f"{ts:.6f} ")
    assert "link-type RAW" in proc.stderr


def test_tshark_reads_it(capture):
    proc = subprocess.run(["tshark", "-r", str(capture), "-T", "fields", "-e", "ip.dst", "-e", "ipv6.dst",
                           "-e", "tcp.dstport", "-e", "udp.dstport"], capture_output=True, text=True, check=True)
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert rows == [c[3] for c in CASES]


def test_empty_capture_is_valid(tmp_path):
    path = tmp_path / "empty.pcap"
    PcapWriter(path).close()
    assert path.stat().st_size == 24
    proc = subprocess.run(["tcpdump", "-r", str(path), "-nn"], capture_output=True, text=True, check=True)
    assert proc.stdout == ""


def test_permissions_and_truncation(tmp_path):
    path = tmp_path / "p.pcap"
    path.write_bytes(b"old contents, much longer than a pcap file header" * 10)
    old = os.umask(0o022)
    try:
        PcapWriter(tmp_path / "new.pcap").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.pcap").stat().st_mode) == 0o640
    PcapWriter(path).close()  # an existing file starts over
    assert path.stat().st_size == 24


def test_snaplen_cuts_but_keeps_the_original_length(tmp_path):
    path = tmp_path / "big.pcap"
    big = packet(6, UDP, ip("2001:db8:1::2"), ip("2001:db8:ffff::9"), 1, 2, b"z" * 65000)
    huge = big + b"\0" * 2000  # 67048 bytes: more than SNAPLEN
    with PcapWriter(path) as writer:
        writer.write(huge, T0)
    _, [(_, _, orig, data)] = read_records(path)
    assert orig == len(huge) and data == huge[: pcap.SNAPLEN]


def test_buffered_until_flush(tmp_path):
    path = tmp_path / "f.pcap"
    writer = PcapWriter(path)
    writer.write(CASES[0][0], T0)
    writer.flush()
    assert path.stat().st_size == 24 + 16 + len(CASES[0][0])
    writer.close()
    writer.close()
    assert writer.closed
    with pytest.raises(ValueError):
        writer.write(CASES[0][0], T0)


def test_bad_timestamp(tmp_path):
    with PcapWriter(tmp_path / "t.pcap") as writer, pytest.raises(ValueError):
        writer.write(CASES[0][0], -1.0)
    _, records = read_records(tmp_path / "t.pcap")
    assert records == []


def test_threads_do_not_interleave(tmp_path):
    path = tmp_path / "threads.pcap"
    per_thread = 300

    def work(writer, n):
        pkt = packet(4, UDP, ip("192.0.2.2"), ip("203.0.113.9"), 30000 + n, 5353, bytes([n]) * (50 + 37 * n))
        for i in range(per_thread):
            writer.write(pkt, T0 + i)

    with PcapWriter(path) as writer:
        threads = [threading.Thread(target=work, args=(writer, n)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.packets == 8 * per_thread
    _, records = read_records(path)
    assert len(records) == 8 * per_thread
    for _, _, orig, data in records:
        n = data[-1]
        assert orig == len(data) == 20 + 8 + 50 + 37 * n and data[28:] == bytes([n]) * (50 + 37 * n)
    proc = subprocess.run(["tcpdump", "-r", str(path), "-nn"], capture_output=True, text=True, check=True)
    assert len(proc.stdout.splitlines()) == 8 * per_thread
