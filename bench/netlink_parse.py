"""What the conversation log pays per conntrack event, and the capture per packet: netlink parsing alone.

    .venv/bin/python bench/netlink_parse.py

The events are real kernel datagrams (one NEW and one DESTROY of a TCP and
of a UDP conversation over lo, with accounting and timestamps on, captured
once), read as the observer reads them: EventSocket.read (fed from memory,
not the socket), then parse_event with the ruleset's mark; "not ours" is the
host's own conversations, whose mark the ruleset did not set. The nflog
batch is 64 packets of 60 bytes, half with a timestamp. Best of N runs.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nftdivert.netlink import ctnetlink, nflog  # noqa: E402
from nftdivert.netlink.codec import attr  # noqa: E402

EVENTS = [bytes.fromhex(h) for h in (
    # new, tcp
    "d8000000000100060000000000000000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001000600000006000200dd9a000006000300b26e00003400028014000180080001007f000001080002007f000001"
    "1c000280050001000600000006000200b26e000006000300dd9a000008000c00d18a1472080003000000000808000700"
    "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
    "0000000008000800002000000c001b0018ee98e5997b264d",
    # destroy, tcp
    "0c0100000201000000000000c06d0000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001000600000006000200e2d6000006000300b26e00003400028014000180080001007f000001080002007f000001"
    "1c000280050001000600000006000200b26e000006000300e2d6000008000c00cc320242080003000000020e08000700"
    "000000771c0009800c00010000000000000000050c000200000000000000010e1c000a800c0001000000000000000005"
    "0c000200000000000000010e1c0014800c00010018ee98e59a70cabc0c00020018ee98e59afeffc5100004800c000180"
    "050001000700000008000800002000000c001b0018ee98e59aff0066",
    # new, udp
    "a8000000000100060000000000000000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001001100000006000200e7d700000600030014e900003400028014000180080001007f000001080002007f000001"
    "1c00028005000100110000000600020014e9000006000300e7d7000008000c0088faaaf9080003000000000808000700"
    "0000001e08000800002000000c001b0018ee98e59a02ed02",
    # destroy, udp
    "fc0000000201000000000000c06d0000020000003400018014000180080001007f000001080002007f0000011c000280"
    "050001001100000006000200b7ed00000600030014e900003400028014000180080001007f000001080002007f000001"
    "1c00028005000100110000000600020014e9000006000300b7ed000008000c002f11d5d7080003000000020808000700"
    "0000001d1c0009800c00010000000000000000010c000200000000000000001d1c000a800c0001000000000000000000"
    "0c00020000000000000000001c0014800c00010018ee98e59a72d0900c00020018ee98e59afed3390800080000200000"
    "0c001b0018ee98e59afed49f",
)]
MARK = 0x200000  # the ruleset's ct mark bit, as the captured entries carry it
ROUNDS, RUNS = 300, 20


class _Memory:
    """A socket whose datagrams are EVENTS, ROUNDS times over."""

    def __init__(self) -> None:
        self.left = [d for _ in range(ROUNDS) for d in EVENTS]
        self.left.reverse()

    def recv_into(self, buf: bytearray, flags: int = 0) -> int:
        if not self.left:
            raise BlockingIOError
        data = self.left.pop()
        buf[:len(data)] = data
        return len(data)


def _events(mark: int) -> float:
    reader = ctnetlink.EventSocket.__new__(ctnetlink.EventSocket)
    reader.sock, reader.overflows, reader._buffer = _Memory(), 0, bytearray(ctnetlink.RECV_BUFFER)
    parse = ctnetlink.parse_event
    start = time.perf_counter()
    while batch := reader.read():
        for kind, payload in batch:
            parse(kind, payload, mark)
    return time.perf_counter() - start


def _batch() -> bytes:
    out = b""
    for i in range(64):
        attrs = [attr(1, struct.pack(">HBB", 0x0800, 0, 0)), attr(4, struct.pack(">I", 2))]
        if i % 2:
            attrs.append(attr(nflog.NFULA_TIMESTAMP, nflog.TIMESTAMP.pack(1_700_000_000, i)))
        attrs.append(attr(nflog.NFULA_PAYLOAD, bytes(60)))
        body = struct.pack("=BBH", 2, 0, 0) + b"".join(attrs)
        out += struct.pack("=IHHII", 16 + len(body), nflog.NFULNL_MSG_PACKET, 0, 0, 0) + body
    return out


def main() -> None:
    events = ROUNDS * len(EVENTS)
    for label, mark in (("ours", MARK), ("not ours", 1)):
        best = min(_events(mark) for _ in range(RUNS))
        print(f"conntrack events, {label}: {best / events * 1e6:.2f} us/event, {events / best:,.0f} events/s")
    buf = _batch()
    best = min(_timed(lambda: nflog.batch(buf, len(buf))) for _ in range(RUNS))
    print(f"nflog: {best * 1e6:.1f} us per 64-packet batch, {best / 64 * 1e6:.2f} us/packet")


def _timed(call) -> float:
    start = time.perf_counter()
    for _ in range(100):
        call()
    return (time.perf_counter() - start) / 100


if __name__ == "__main__":
    main()
