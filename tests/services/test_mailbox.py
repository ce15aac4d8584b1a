"""POP3 and IMAP answers, command by command (pure)."""

from __future__ import annotations

import base64
import imaplib
import poplib

from fixed import events, listening
from nftdivert.services import mailbox
from nftdivert.services.inbox import Message

BOX = (Message("Subject: one\r\n\r\n.dot line\r\nsecond\r\n"), Message("Subject: two\r\n\r\nx\r\n"))


def test_pop3_user_and_pass_make_one_login_and_an_empty_maildrop():
    state: dict = {}
    assert mailbox.pop3_answer("USER bot", state) == (["+OK"], None, False)
    reply, login, close = mailbox.pop3_answer("PASS pass word", state)
    assert reply[0].startswith("+OK") and login == {"user": "bot", "password": "pass word"} and not close
    assert mailbox.pop3_answer("STAT", state)[0] == ["+OK 0 0"]
    assert mailbox.pop3_answer("LIST", state)[0] == ["+OK 0 messages", "."]
    assert mailbox.pop3_answer("RETR 1", state)[0][0].startswith("-ERR")
    assert mailbox.pop3_answer("QUIT", state)[2] is True


def test_pop3_lists_retrieves_dot_stuffed_and_tops_the_messages():
    size = BOX[0].size
    assert mailbox.pop3_answer("STAT", {}, BOX)[0] == [f"+OK 2 {size + BOX[1].size}"]
    assert mailbox.pop3_answer("LIST", {}, BOX)[0] == ["+OK 2 messages", f"1 {size}", f"2 {BOX[1].size}", "."]
    assert mailbox.pop3_answer("LIST 2", {}, BOX)[0] == [f"+OK 2 {BOX[1].size}"]
    assert mailbox.pop3_answer("UIDL", {}, BOX)[0] == ["+OK 2 messages", "1 1", "2 2", "."]
    assert mailbox.pop3_answer("RETR 1", {}, BOX)[0] == [f"+OK {size} octets", "Subject: one", "", "..dot line",
                                                         "second", "."]
    assert mailbox.pop3_answer("TOP 1 1", {}, BOX)[0] == ["+OK", "Subject: one", "", "..dot line", "."]
    assert mailbox.pop3_answer("RETR 3", {}, BOX)[0] == ["-ERR no such message"]


def test_imap_sequence_sets():
    assert mailbox.sequence("1", 2) == [1] and mailbox.sequence("1:*", 2) == [1, 2]
    assert mailbox.sequence("2,1,9", 2) == [1, 2] and mailbox.sequence("*", 2) == [2]
    assert mailbox.sequence("x", 2) == []


def test_imap_fetch_gives_literals_of_the_message_its_header_and_size():
    reply = mailbox.imap_answer("a1 FETCH 1 (RFC822.SIZE BODY.PEEK[HEADER] FLAGS)", BOX)[0]
    assert reply[0] == (f"* 1 FETCH (RFC822.SIZE {BOX[0].size} BODY[HEADER] {{16}}\r\nSubject: one\r\n\r\n "
                        "FLAGS (\\Seen))")
    uid = mailbox.imap_answer("a2 UID FETCH 2 (BODY[])", BOX)[0][0]
    assert uid == f"* 2 FETCH (UID 2 BODY[] {{{BOX[1].size}}}\r\n{BOX[1].text})"
    assert mailbox.imap_answer("a3 SEARCH UNSEEN", BOX)[0] == ["* SEARCH 1 2", "a3 OK SEARCH completed"]


def test_pop3_stls_then_message_1_is_read_inside_tls(tmp_path):
    with listening(tmp_path, "pop3") as (port, records, ctx):
        p = poplib.POP3("127.0.0.1", port, timeout=10)
        assert "STLS" in p.capa()
        p.stls(context=ctx)
        assert "STLS" not in p.capa()
        p.user("bot")
        p.pass_("pw")
        assert p.stat()[0] == 1 and b"Subject: Welcome" in p.retr(1)[1]
        p.quit()
    assert events(records, "tls")[0]["starttls"] is True
    assert events(records, "pop3") == [dict(events(records, "pop3")[0], user="bot", password="pw")]


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
    reply, login, close = mailbox.imap_answer('a1 LOGIN "us er" "p\\"w"')
    assert reply == ["a1 OK LOGIN completed"] and login == {"user": "us er", "password": 'p"w'} and not close
    assert mailbox.imap_answer("a2 login bot secret")[1] == {"user": "bot", "password": "secret"}


def test_imap_select_of_an_empty_box_finds_nothing_and_logout_closes():
    reply = mailbox.imap_answer("a3 SELECT INBOX")[0]
    assert "* 0 EXISTS" in reply and reply[-1].startswith("a3 OK [READ-WRITE]")
    assert mailbox.imap_answer("a4 UID SEARCH ALL")[0] == ["* SEARCH", "a4 OK SEARCH completed"]
    assert mailbox.imap_answer("a5 LOGOUT")[2] is True
    assert mailbox.imap_answer("a6 FROB")[0] == ["a6 BAD unknown command"]


def test_sasl_plain_gives_user_and_password_and_garbage_is_kept_short():
    assert mailbox.plain_credentials(base64.b64encode(b"\0bot\0pw").decode()) == {"user": "bot", "password": "pw"}
    assert mailbox.plain_credentials("!!" * 500) == {"data": "!!" * 128}


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
