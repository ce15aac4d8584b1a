"""TFTP (RFC 1350, options RFC 2347-2349): reads get a file by extension, writes are kept.

The whole transfer stays on the tuple the client asked for: the server's
answers come from port 69 itself, not from a new port (transfer ID) as RFC
1350 suggests. Through the diverter a new server port would be a new
conversation the client never opened: conntrack (kernel path) and the queue
worker (queue path) only answer on the tuple they know. Clients such as
curl and tftp-hpa take their peer's port from the first answer, so they
follow. A pure state machine: `answer` takes one datagram and returns the
one to send back (or None); the listener sends it.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from nftdivert.services import payloads
from nftdivert.services.mailstore import keep

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
BLOCK = 512
MAX_BLOCK = 1428  # a bigger block would not fit the queue path's copy with its headers; 1428 fits a 1500 MTU
MAX_UPLOAD = 64 * 1024 * 1024  # bytes kept of one upload; beyond it the client gets "disk full"
IDLE = 30.0  # seconds a transfer may pause before it is forgotten
MAX_SESSIONS = 1024


def error(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode() + b"\0"


def parse_request(packet: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(file, mode, options) of a RRQ or WRQ; None if it is not well formed."""
    parts = packet[2:].split(b"\0")
    if len(parts) < 3 or parts[-1] != b"" or not parts[0]:
        return None
    words = [p.decode("utf-8", "replace") for p in parts[:-1]]
    options = {words[i].lower(): words[i + 1] for i in range(2, len(words) - 1, 2)}
    return words[0], words[1].lower(), options


def to_netascii(data: bytes) -> bytes:
    """RFC 764's form on the wire: LF as CR LF, a bare CR as CR NUL (the client turns it back)."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def from_netascii(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


def served_file(name: str) -> bytes:
    """The payload for the name's extension; without a known one, an ELF executable: what IoT droppers fetch."""
    base = name.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[1] if "." in base else ""
    typed = payloads.by_extension(ext) if ext else None
    return typed[1] if typed is not None else payloads.by_extension("elf")[1]


def _agreed(options: dict[str, str], size: int | None) -> tuple[int, dict[str, str]]:
    """The block size and the options acknowledged (the others are ignored, as RFC 2347 allows)."""
    agreed: dict[str, str] = {}
    block = BLOCK
    if options.get("blksize", "").isdigit() and int(options["blksize"]) >= 8:
        block = min(int(options["blksize"]), MAX_BLOCK)
        agreed["blksize"] = str(block)
    if "tsize" in options:
        agreed["tsize"] = str(size if size is not None else options["tsize"])
    if options.get("timeout", "").isdigit() and 1 <= int(options["timeout"]) <= 255:
        agreed["timeout"] = options["timeout"]
    return block, agreed


def _oack(agreed: dict[str, str]) -> bytes:
    return struct.pack("!H", OACK) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in agreed.items())


@dataclass
class _Transfer:
    writing: bool
    name: str
    mode: str
    block_size: int
    data: bytes | bytearray = b""  # a read: the file; a write: what arrived so far
    block: int = 0  # a read: the last block sent; a write: the last block acknowledged
    done: bool = False
    last: float = field(default_factory=time.monotonic)

    def data_block(self, number: int) -> bytes:
        start = (number - 1) * self.block_size
        return struct.pack("!HH", DATA, number & 0xFFFF) + self.data[start:start + self.block_size]

    @property
    def blocks(self) -> int:
        """Blocks of the file to read; the last one is shorter than block_size (maybe empty)."""
        return len(self.data) // self.block_size + 1


class Tftp:
    """Transfers by key (the client's and the listener's endpoints); `emit` gets each read and each write."""

    def __init__(self, emit, uploads_dir: str = "") -> None:
        self._emit, self._uploads = emit, uploads_dir
        self._transfers: dict[tuple, _Transfer] = {}

    def answer(self, key: tuple, packet: bytes, base: dict) -> bytes | None:
        if len(packet) < 4:
            return error(4, "Illegal TFTP operation")
        opcode = struct.unpack_from("!H", packet)[0]
        if opcode in (RRQ, WRQ):
            return self._request(key, opcode == WRQ, packet, base)
        transfer = self._transfers.get(key)
        if transfer is None:
            return None if opcode == ERROR else error(5, "Unknown transfer ID")
        transfer.last = time.monotonic()
        number = struct.unpack_from("!H", packet, 2)[0]
        if opcode == ERROR:  # the client gave up
            self._transfers.pop(key, None)
            return None
        if opcode == ACK and not transfer.writing:
            return self._acked(key, transfer, number)
        if opcode == DATA and transfer.writing:
            return self._written(key, transfer, number, packet[4:], base)
        return error(4, "Illegal TFTP operation")

    def _request(self, key: tuple, writing: bool, packet: bytes, base: dict) -> bytes:
        parsed = parse_request(packet)
        if parsed is None:
            return error(4, "Illegal TFTP operation")
        name, mode, options = parsed
        self._forget_idle()
        data = bytearray() if writing else served_file(name)
        if mode == "netascii" and not writing:  # the client converts it back: the file arrives as it is
            data = to_netascii(data)
        block_size, agreed = _agreed(options, None if writing else len(data))
        transfer = _Transfer(writing, name, mode, block_size, data)
        self._transfers[key] = transfer
        record = dict(base, event="tftp", operation="write" if writing else "read", file=name[:512], mode=mode)
        if options:
            record["options"] = {k[:32]: v[:64] for k, v in list(options.items())[:16]}
        if not writing:
            self._emit(dict(record, size=len(data)))
        if agreed:
            return _oack(agreed)  # the client answers ACK 0 (read) or DATA 1 (write)
        if writing:
            return struct.pack("!HH", ACK, 0)
        transfer.block = 1
        return transfer.data_block(1)

    def _acked(self, key: tuple, transfer: _Transfer, number: int) -> bytes | None:
        if number == transfer.block & 0xFFFF:
            if transfer.block >= transfer.blocks:  # the last block arrived
                self._transfers.pop(key, None)
                return None
            transfer.block += 1
            return transfer.data_block(transfer.block)
        if transfer.block and number == (transfer.block - 1) & 0xFFFF:
            return transfer.data_block(transfer.block)  # our block was lost: the client acknowledged the one before
        return None

    def _written(self, key: tuple, transfer: _Transfer, number: int, data: bytes, base: dict) -> bytes:
        ack = struct.pack("!HH", ACK, number)
        if transfer.done or number != (transfer.block + 1) & 0xFFFF:
            return ack if number == transfer.block & 0xFFFF else error(4, "Illegal TFTP operation")
        if len(transfer.data) + len(data) > MAX_UPLOAD:
            self._transfers.pop(key, None)
            return error(3, "Disk full or allocation exceeded")
        transfer.data += data
        transfer.block += 1
        if len(data) < transfer.block_size:
            transfer.done = True  # kept a while: a lost last ACK is asked for again
            kept = bytes(transfer.data)
            self._emit(dict(base, event="tftp", operation="write", file=transfer.name[:512], mode=transfer.mode,
                            **keep(self._uploads, from_netascii(kept) if transfer.mode == "netascii" else kept)))
        return ack

    def _forget_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._transfers.items() if now - t.last > IDLE]:
            del self._transfers[key]
        while len(self._transfers) >= MAX_SESSIONS:
            del self._transfers[next(iter(self._transfers))]
