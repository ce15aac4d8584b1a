"""POP3 and IMAP answers, command by command (pure)."""

from __future__ import annotations

import base64

from nftdivert.services import mailbox


def test_pop3_user_and_pass_make_one_login_and_an_empty_maildrop():
    state: dict = {}
    assert mailbox.pop3_answer("USER bot", state) == (["+OK"], None, False)
    reply, login, close = mailbox.pop3_answer("PASS pass word", state)
    assert reply[0].startswith("+OK") and login == {"user": "bot", "password": "pass word"} and not close
    assert mailbox.pop3_answer("STAT", state)[0] == ["+OK 0 0"]
    assert mailbox.pop3_answer("LIST", state)[0] == ["+OK 0 messages", "."]
    assert mailbox.pop3_answer("RETR 1", state)[0][0].startswith("-ERR")
    assert mailbox.pop3_answer("QUIT", state)[2] is True


def test_imap_login_takes_quoted_arguments_with_escapes():
    reply, login, close = mailbox.imap_answer('a1 LOGIN "us er" "p\\"w"')
    assert reply == ["a1 OK LOGIN completed"] and login == {"user": "us er", "password": 'p"w'} and not close
    assert mailbox.imap_answer("a2 login bot secret")[1] == {"user": "bot", "password": "secret"}


def test_imap_select_finds_nothing_and_logout_closes():
    reply = mailbox.imap_answer("a3 SELECT INBOX")[0]
    assert "* 0 EXISTS" in reply and reply[-1].startswith("a3 OK [READ-WRITE]")
    assert mailbox.imap_answer("a4 UID SEARCH ALL")[0] == ["* SEARCH", "a4 OK SEARCH completed"]
    assert mailbox.imap_answer("a5 LOGOUT")[2] is True
    assert mailbox.imap_answer("a6 FROB")[0] == ["a6 BAD unknown command"]


def test_sasl_plain_gives_user_and_password_and_garbage_is_kept_short():
    assert mailbox.plain_credentials(base64.b64encode(b"\0bot\0pw").decode()) == {"user": "bot", "password": "pw"}
    assert mailbox.plain_credentials("!!" * 500) == {"data": "!!" * 128}
