"""A record as an RFC 5424 message, framed by octet counting (RFC 6587)."""
from __future__ import annotations

from nftdivert.observers.rfc5424 import Header, frame

HEADER = Header(facility=16, hostname="gw1", app_name="nftdivert", procid=4242)


def test_the_message_carries_the_record_s_time_event_and_json():
    msg = HEADER.message('{"v": 1, "event": "start"}', "2026-11-28T04:14:59.439Z", "start")
    # local0 (16) * 8 + informational (6) = 134; version 1; no structured data.
    assert msg == b'<134>1 2026-11-28T04:14:59.439Z gw1 nftdivert 4242 start - {"v": 1, "event": "start"}'


def test_header_fields_that_would_break_the_message_become_nil_or_printable():
    odd = Header(facility=1, hostname="", app_name="a b\x00c", procid=1)
    assert odd.message("{}", None, "") == b"<14>1 - - abc 1 - - {}"
    long_event = Header(3, "h" * 300, "x", 7).message("{}", "t", "e" * 40).split(b" ")
    assert len(long_event[2]) == 255 and len(long_event[5]) == 32  # RFC 5424's HOSTNAME and MSGID bounds


def test_octet_counting_counts_bytes_and_frames_follow_each_other():
    assert frame(b"<14>1 - - x 1 - - {}") == b"20 <14>1 - - x 1 - - {}"
    assert frame("é".encode()) == b"2 \xc3\xa9"
    assert frame(b"ab") + frame(b"") == b"2 ab0 "
