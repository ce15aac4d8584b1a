"""nflog messages to packets, and the times a capture gives them (pure: no kernel here;
tests/e2e/test_e2e_pcap.py reads the real thing)."""

from __future__ import annotations

import struct

from nftdivert.netlink import codec, nflog


def message(payload: bytes, stamp: tuple[int, int] | None = None, kind: int = nflog.NFULNL_MSG_PACKET) -> bytes:
    attrs = [codec.attr(1, struct.pack(">HBB", 0x0800, 0, 0)), codec.attr(4, struct.pack(">I", 2))]
    if stamp is not None:
        attrs.append(codec.attr(nflog.NFULA_TIMESTAMP, nflog.TIMESTAMP.pack(*stamp)))
    attrs.append(codec.attr(nflog.NFULA_PAYLOAD, payload))
    body = codec.NFGENMSG.pack(2, 0, 0) + b"".join(attrs)
    return codec.NLMSGHDR.pack(codec.NLMSGHDR.size + len(body), kind, 0, 0, 0) + body


def test_a_batch_yields_each_payload_with_the_kernels_time_if_it_gave_one():
    buf = message(b"E-in", (1700000000, 250000)) + message(b"E-out-odd") + message(b"", kind=3)  # NLMSG_DONE
    got = nflog.batch(buf, len(buf))
    assert got == [nflog.Packet(b"E-in", 1700000000.25), nflog.Packet(b"E-out-odd", None)]


def test_a_message_cut_short_ends_the_batch_without_an_error():
    buf = message(b"first", (1, 0)) + message(b"second", (2, 0))
    assert nflog.batch(buf, len(buf) - 3) == [nflog.Packet(b"first", 1.0)]
    assert nflog.batch(buf + bytes(100), len(buf) + 100)[-1] == nflog.Packet(b"second", 2.0)  # trailing zeros


def test_a_sent_packet_gets_the_earliest_later_received_time_or_the_batch_time_and_time_never_goes_back():
    packets = [nflog.Packet(b"a", 10.0), nflog.Packet(b"b", None), nflog.Packet(b"c", 10.5),
               nflog.Packet(b"d", None), nflog.Packet(b"e", 10.2)]
    assert nflog.timed(packets, received=11.0, floor=9.0) == [
        (b"a", 10.0), (b"b", 10.2), (b"c", 10.5), (b"d", 10.5), (b"e", 10.5)]
    assert nflog.timed([nflog.Packet(b"x", None)], received=12.0, floor=11.0) == [(b"x", 12.0)]
    assert nflog.timed([nflog.Packet(b"x", 5.0)], received=12.0, floor=11.0) == [(b"x", 11.0)]
