"""IMAP's answers, command by command (pure), and STARTTLS, FETCH and APPEND with a real client."""

from __future__ import annotations

import imaplib

from fixed import events, listening
from nftdivert.services import imap
from nftdivert.services.inbox import Message

BOX = (Message("Subject: one\r\n\r\n.dot line\r\nsecond\r\n"), Message("Subject: two\r\n\r\nx\r\n"))


def test_imap_sequence_sets():
    assert imap.sequence("1", 2) == [1] and imap.sequence("1:*", 2) == [1, 2]
    assert imap.sequence("2,1,9", 2) == [1, 2] and imap.sequence("*", 2) == [2]
    assert imap.sequence("x", 2) == []


def test_imap_fetch_gives_literals_of_the_message_its_header_and_size():
    reply = imap.imap_answer("a1 FETCH 1 (RFC822.SIZE BODY.PEEK[HEADER] FLAGS)", BOX)[0]
    assert reply[0] == (f"* 1 FETCH (RFC822.SIZE {BOX[0].size} BODY[HEADER] {{16}}\r\nSubject: one\r\n\r\n "
                        "FLAGS (\\Seen))")
    uid = imap.imap_answer("a2 UID FETCH 2 (BODY[])", BOX)[0][0]
    assert uid == f"* 2 FETCH (UID 2 BODY[] {{{BOX[1].size}}}\r\n{BOX[1].text})"
    assert imap.imap_answer("a3 SEARCH UNSEEN", BOX)[0] == ["* SEARCH 1 2", "a3 OK SEARCH completed"]


def test_imap_starttls_then_message_1_is_fetched_inside_tls(tmp_path):
    with listening(tmp_path, "imap") as (port, records, ctx):
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        assert "STARTTLS" in m.capabilities
        m.starttls(ssl_context=ctx)
        m.login("bot", "pw")
        assert m.select("INBOX") == ("OK", [b"1"]) and m.search(None, "ALL") == ("OK", [b"1"])
        typ, data = m.fetch("1", "(RFC822)")
        assert typ == "OK" and b"Subject: Welcome" in data[0][1]
        m.logout()
    assert events(records, "tls")[0]["starttls"] is True and events(records, "imap")[0]["user"] == "bot"


def test_imap_login_takes_quoted_arguments_with_escapes():
    reply, login, close = imap.imap_answer('a1 LOGIN "us er" "p\\"w"')
    assert reply == ["a1 OK LOGIN completed"] and login == {"user": "us er", "password": 'p"w'} and not close
    assert imap.imap_answer("a2 login bot secret")[1] == {"user": "bot", "password": "secret"}


def test_imap_select_of_an_empty_box_finds_nothing_and_logout_closes():
    reply = imap.imap_answer("a3 SELECT INBOX")[0]
    assert "* 0 EXISTS" in reply and reply[-1].startswith("a3 OK [READ-WRITE]")
    assert imap.imap_answer("a4 UID SEARCH ALL")[0] == ["* SEARCH", "a4 OK SEARCH completed"]
    assert imap.imap_answer("a5 LOGOUT")[2] is True
    assert imap.imap_answer("a6 FROB")[0] == ["a6 BAD unknown command"]


def test_imap_append_of_a_message_in_a_literal_is_kept_and_logged(tmp_path):
    stolen = b"From: bot@victim.example\r\nSubject: loot\r\n\r\n\"quoted\" {7}\r\npasswords\r\n"
    with listening(tmp_path, "imap") as (port, records, _ctx):
        m = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        m.login("bot", "pw")
        assert m.append("Drafts", None, None, stolen)[0] == "OK"  # a synchronising literal: "+" first
        m._simple_command("APPEND", "Sent", "{%d+}\r\n%s" % (len(b"x"), "x"))  # LITERAL+: no wait
        assert m.noop()[0] == "OK"
        m.logout()
    first, second = events(records, "imap_append")
    assert first["mailbox"] == "Drafts" and ["Subject", "loot"] in first["headers"]
    assert (tmp_path / "mail" / (first["sha256"] + ".eml")).read_bytes() == stolen
    assert second["mailbox"] == "Sent" and second["size"] == 1
