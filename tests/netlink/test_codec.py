"""Netlink framing: attributes, messages, the kernel's errors and acks (against a fake kernel: a socketpair)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from nftdivert.netlink import codec
from nftdivert.netlink.codec import NLMSGHDR, NetlinkError, NetlinkFormatError


def _msg(msg_type: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    data = codec.message(msg_type, flags, seq, body)
    return data + b"\0" * (-len(data) % 4)


def _error(seq: int, error: int, reason: str = "") -> bytes:
    body = struct.pack("=i", error) + NLMSGHDR.pack(16, 0, 0, seq, 0)
    if not reason:
        return _msg(codec.NLMSG_ERROR, seq, body, codec.NLM_F_CAPPED)
    body += codec.attr(codec.NLMSGERR_ATTR_MSG, reason.encode() + b"\0")
    return _msg(codec.NLMSG_ERROR, seq, body, codec.NLM_F_CAPPED | codec.NLM_F_ACK_TLVS)


def test_attributes_are_padded_and_read_back_by_type_without_their_flags():
    data = codec.attr(1, b"abc") + codec.attr(2, codec.attr(7, b"\x01"), nested=True) + codec.attr(1, b"later")
    assert len(codec.attr(1, b"abc")) == 8 and struct.unpack_from("=H", data, 0)[0] == 7  # padding not in nla_len
    found = codec.attrs(data)
    assert bytes(found[1]) == b"abc" and list(found) == [1, 2]  # a repeated type keeps its first
    assert bytes(codec.attrs(found[2])[7]) == b"\x01"


def test_an_attribute_running_past_the_end_is_a_format_error():
    with pytest.raises(NetlinkFormatError) as info:
        codec.attrs(struct.pack("=HH", 40, 1) + b"abcd")
    assert info.value.errno == errno.EPROTO and isinstance(info.value, OSError)


def test_messages_are_aligned_and_a_truncated_one_is_a_format_error():
    data = _msg(16, 5, b"odd") + _msg(17, 6, b"four")
    assert [(t, s, bytes(p)) for t, _f, s, p in codec.messages(data)] == [(16, 5, b"odd"), (17, 6, b"four")]
    assert [t for t, *_ in codec.messages(data + bytes(64), len(data))] == [16, 17]
    with pytest.raises(NetlinkFormatError):
        list(codec.messages(data[:-2]))


def test_an_error_carries_the_kernels_reason():
    (_t, flags, _s, payload), = codec.messages(_error(1, -errno.EINVAL, "missing tuple"))
    assert codec.error_of(flags, payload) == (errno.EINVAL, "missing tuple")
    (_t, flags, _s, payload), = codec.messages(_error(1, 0))
    assert codec.error_of(flags, payload) == (0, "")


@pytest.fixture
def kernel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(1)
    with ours, theirs:
        yield ours, theirs


def test_answers_skip_late_ones_and_end_at_the_ack(kernel):
    ours, theirs = kernel
    theirs.send(_msg(16, 41, b"late") + _error(41, 0))  # an earlier request's, answered late
    theirs.send(_msg(codec.NLMSG_NOOP, 42, b"") + _msg(16, 42, b"mine") + _error(42, 0))
    assert [(t, bytes(p)) for t, p in codec.answers(ours, 42)] == [(16, b"mine")]


def test_a_dump_ends_at_done_and_an_error_raises(kernel):
    ours, theirs = kernel
    theirs.send(_msg(16, 1, b"a") + _msg(16, 1, b"b"))
    theirs.send(_msg(codec.NLMSG_DONE, 1, struct.pack("=i", 0)))
    assert [bytes(p) for _t, p in codec.dump(ours, 20, b"q")] == [b"a", b"b"]
    (_t, flags, seq, body), = codec.messages(theirs.recv(100))
    assert (flags, seq, bytes(body)) == (codec.NLM_F_REQUEST | codec.NLM_F_DUMP, 1, b"q")
    theirs.send(_error(1, -errno.EPERM, "not yours"))
    with pytest.raises(NetlinkError) as info:
        codec.request(ours, 20, b"")
    assert info.value.errno == errno.EPERM and "not yours" in str(info.value)
