"""nfnetlink_queue: the two messages the queue worker handles itself.

NetfilterQueue reads the queue's packets and gives their verdicts; the
worker reads each message first, and drops the packet of one that
NetfilterQueue never handed to the callback (cut off, or unparsable), so
the packet does not hold a slot of the queue forever.
"""
from __future__ import annotations

import socket
import struct

from nftdivert.netlink.codec import NFGENMSG, NLM_F_REQUEST, NLMSGHDR, attr, attrs, message

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = NFNL_SUBSYS_QUEUE << 8
NFQNL_MSG_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1
NFQA_PACKET_HDR = 1  # struct nfqnl_msg_packet_hdr: be32 packet id, ...
NFQA_VERDICT_HDR = 2  # struct nfqnl_msg_verdict_hdr: be32 verdict, be32 packet id
NF_DROP = 0
_ATTRS_AT = NLMSGHDR.size + NFGENMSG.size


def packet_id(data: bytes) -> int | None:
    """The packet id of a packet message, also of one cut off by the receive
    buffer (the packet header is its first attribute); None: another message,
    or too short to tell."""
    if len(data) < _ATTRS_AT or NLMSGHDR.unpack_from(data)[1] != NFQNL_MSG_PACKET:
        return None
    header = attrs(memoryview(data)[_ATTRS_AT:], cut_off=True).get(NFQA_PACKET_HDR)
    return struct.unpack_from("!I", header)[0] if header is not None and len(header) >= 4 else None


def drop_verdict(queue: int, packet: int) -> bytes:
    """The message that drops packet `packet` of queue `queue`."""
    return message(NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0,
                   NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(queue))  # res_id: the queue, big-endian
                   + attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_DROP, packet)))
