"""Syslog datagrams as log fields."""

from __future__ import annotations

from nftdivert.services import syslog


def test_rfc_3164_priority_splits_into_facility_and_severity():
    assert syslog.record(b"<13>Dec  6 04:17:45 host sample: hello\n") == {
        "size": 39, "facility": 1, "severity": "notice", "message": "Dec  6 04:17:45 host sample: hello"}


def test_rfc_5424_keeps_the_rest_as_the_message():
    rec = syslog.record(b"<165>1 2026-12-06T04:17:45Z host app - - - hi")
    assert rec["facility"] == 20 and rec["severity"] == "notice" and rec["message"].endswith("hi")


def test_no_priority_or_a_bad_one_is_all_message():
    assert syslog.record(b"plain") == {"size": 5, "message": "plain"}
    assert "facility" not in syslog.record(b"<999>x")


def test_a_long_message_is_cut():
    assert len(syslog.record(b"<1>" + b"x" * 10000)["message"]) == syslog.MAX_MESSAGE
