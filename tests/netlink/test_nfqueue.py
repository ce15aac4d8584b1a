"""nfnetlink_queue: a packet's id, also from a message cut off; the verdict that drops it."""

from __future__ import annotations

import socket
import struct

from nftdivert.netlink import codec, nfqueue


def _packet_message(packet: int, payload: bytes) -> bytes:
    body = (codec.NFGENMSG.pack(socket.AF_INET, 0, socket.htons(7))
            + codec.attr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet, 0x0800, 3))
            + codec.attr(10, payload))  # NFQA_PAYLOAD
    return codec.message(nfqueue.NFQNL_MSG_PACKET, 0, 0, body)


def test_the_packet_id_is_read_also_from_a_message_cut_off():
    whole = _packet_message(0xDEADBEEF, bytes(5000))
    assert nfqueue.packet_id(whole) == 0xDEADBEEF
    assert nfqueue.packet_id(whole[:4096]) == 0xDEADBEEF
    assert nfqueue.packet_id(whole[:22]) is None  # not even the header's attribute
    assert nfqueue.packet_id(codec.message(codec.NLMSG_DONE, 0, 0, bytes(8))) is None


def test_the_drop_verdict_names_the_queue_big_endian_and_the_packet():
    data = nfqueue.drop_verdict(7, 42)
    (msg_type, flags, _seq, body), = codec.messages(data)
    assert (len(data), msg_type, flags) == (32, nfqueue.NFQNL_MSG_VERDICT, codec.NLM_F_REQUEST)
    assert body[:4] == bytes([socket.AF_UNSPEC, 0, 0, 7])
    assert bytes(codec.attrs(body[4:])[nfqueue.NFQA_VERDICT_HDR]) == struct.pack("!II", nfqueue.NF_DROP, 42)
