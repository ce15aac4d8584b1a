"""Packets to a classic libpcap file: the capture (-w) and the worker's view (--write-rewritten).

Classic pcap rather than pcapng: every tool reads it, and the format is two
fixed headers. LINKTYPE_RAW means each record is a bare IP packet whose
version nibble says IPv4 or IPv6, so both families share one file, which is
exactly what the queue and nflog hand us (no link-layer header).
"""
from __future__ import annotations

import os
import struct
import threading
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps; written in host byte order, readers detect it
PCAP_VERSION = (2, 4)
SNAPLEN = 65535
LINKTYPE_RAW = 101  # raw IPv4 or IPv6, no link-layer header
FILE_MODE = 0o640  # captures hold conversation contents: not world-readable

# struct pcap_file_header: magic, version major/minor, thiszone, sigfigs, snaplen, linktype.
FILE_HEADER = struct.Struct("=IHHiIII")
# struct pcap_pkthdr (on disk): seconds, microseconds, captured length, original length.
RECORD_HEADER = struct.Struct("=IIII")


def file_header() -> bytes:
    return FILE_HEADER.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, SNAPLEN, LINKTYPE_RAW)


def record(packet: bytes, timestamp: float) -> bytes:
    """One record: the header plus the packet, cut to SNAPLEN (orig_len keeps the real size)."""
    return b"".join(record_parts(packet, timestamp))


def record_parts(packet: bytes | memoryview, timestamp: float) -> tuple[bytes, bytes | memoryview]:
    """A record as (header, data), so a batch of them can be joined with one copy."""
    if not 0 <= timestamp < 2**32:
        raise ValueError(f"timestamp out of range for pcap: {timestamp!r}")
    seconds = int(timestamp)
    micros = round((timestamp - seconds) * 1_000_000)
    if micros >= 1_000_000:  # rounding carried into the next second
        seconds, micros = seconds + 1, micros - 1_000_000
    data = packet[:SNAPLEN]
    return RECORD_HEADER.pack(seconds, micros, len(data), len(packet)), data


class PcapWriter:
    """Appends packets to a new capture file; safe to share between threads.

    The file is created (or truncated) at construction, mode 0o640 before the
    umask, and the file header written at once, so even a capture with no
    packets is a valid file. Writes are buffered: call flush() to make them
    visible to readers, close() at the end.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, fd: int | None = None) -> None:
        """Opens `path`, or writes to `fd`, a file already opened (and then owned by the writer)."""
        self.path = os.fspath(path) if path is not None else f"fd {fd}"
        self._lock = threading.Lock()
        if fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            self._file: BinaryIO | None = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        self.packets = 0
        self._file.write(file_header())

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, packet: bytes, timestamp: float) -> None:
        """Append one raw IP packet seen at `timestamp` (seconds since the epoch, e.g. time.time())."""
        data = record(packet, timestamp)  # outside the lock: validation and copying
        with self._lock:
            if self._file is None:
                raise ValueError("PcapWriter is closed")
            self._file.write(data)
            self.packets += 1

    def write_many(self, packets: list[tuple[bytes | memoryview, float]]) -> None:
        """Append a batch of (packet, timestamp) with one write: what a capture reader gets at once."""
        data = b"".join(part for packet, stamp in packets for part in record_parts(packet, stamp))
        with self._lock:
            if self._file is None:
                raise ValueError("PcapWriter is closed")
            self._file.write(data)
            self.packets += len(packets)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()  # flushes
                finally:
                    self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None
