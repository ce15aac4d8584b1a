"""SMTP on a loopback listener of its kind: STARTTLS offered, upgraded, the mail and login logged inside."""

from __future__ import annotations

import smtplib

from fixed import events, listening


def test_starttls_is_offered_then_upgrades_and_is_not_offered_again(tmp_path):
    with listening(tmp_path, "smtp") as (port, records, ctx):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.ehlo()[0] == 250 and s.has_extn("starttls")
            assert s.starttls(context=ctx)[0] == 220
            s.ehlo()
            assert not s.has_extn("starttls") and s.has_extn("auth")
            s.login("bot", "hunter2")
            s.sendmail("a@b.example", ["c@d.example"], b"Subject: inside\r\n\r\nhi\r\n")
    (hello,) = events(records, "tls")
    assert hello["starttls"] is True and hello["result"] == "ok"
    assert events(records, "smtp_auth")[0]["password"] == "hunter2"
    assert ["Subject", "inside"] in events(records, "smtp")[0]["headers"]


def test_a_failed_starttls_handshake_is_logged_and_the_conversation_ends(tmp_path):
    with listening(tmp_path, "smtp") as (port, records, _ctx):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo()
            assert s.docmd("STARTTLS")[0] == 220
            s.sock.sendall(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00")  # a ClientHello that is not one
            assert s.sock.recv(100)[:1] in (b"\x15", b"")  # an alert, or the close
    assert events(records, "tls")[0]["result"] == "failed"


def test_inside_tls_starttls_is_neither_offered_nor_accepted(tmp_path):
    with listening(tmp_path, "smtp") as (port, _records, ctx):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.starttls(context=ctx)
            s.ehlo()
            assert s.docmd("STARTTLS")[0] == 454
            assert s.noop()[0] == 250  # the conversation goes on
