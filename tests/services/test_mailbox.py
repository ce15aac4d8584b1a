"""POP3's answers, command by command (pure), and its STLS with a real client."""

from __future__ import annotations

import base64
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


def test_sasl_plain_gives_user_and_password_and_garbage_is_kept_short():
    assert mailbox.plain_credentials(base64.b64encode(b"\0bot\0pw").decode()) == {"user": "bot", "password": "pw"}
    assert mailbox.plain_credentials("!!" * 500) == {"data": "!!" * 128}
