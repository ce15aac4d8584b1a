"""The IRC session: registration, JOIN, PRIVMSG, PING, on a scripted stream."""

from __future__ import annotations

import asyncio

from streams import Stream
from nftdivert.services import irc


def session(*chunks: bytes) -> tuple[list[str], list[dict]]:
    stream, records = Stream(*chunks), []
    asyncio.run(irc.serve(stream, records.append, {"client": "c"}, "irc.example.net", "192.0.2.2"))
    return stream.written.decode().split("\r\n")[:-1], records


def test_parse_keeps_the_trailing_parameter_whole():
    assert irc.parse(":nick!u@h PRIVMSG #c :hello there :)") == ("PRIVMSG", ["#c", "hello there :)"])
    assert irc.parse("user bot 0 * :Real Name") == ("USER", ["bot", "0", "*", "Real Name"])
    assert irc.parse("   ") == ("", [])


def test_registration_gets_the_welcome_burst_and_is_logged():
    lines, records = session(b"PASS pw\r\nNICK bot\r\n", b"USER u 0 * :Real\r\n")
    codes = [line.split()[1] for line in lines]
    assert codes[:5] == ["001", "002", "003", "004", "005"] and "376" in codes
    assert lines[0] == ":irc.example.net 001 bot :Welcome to the IRCnet IRC Network bot!u@192.0.2.2"
    assert records == [{"client": "c", "event": "irc", "command": "register", "nick": "bot", "user": "u",
                        "realname": "Real", "password": "pw"}]


def test_cap_negotiation_holds_the_welcome_until_cap_end():
    lines, _ = session(b"CAP LS 302\r\nNICK bot\r\nUSER u 0 * :R\r\n", b"CAP REQ :sasl\r\n", b"CAP END\r\n")
    assert lines[:2] == [":irc.example.net CAP * LS :", ":irc.example.net CAP * NAK :sasl"]
    assert lines[2].split()[1] == "001"


def test_join_privmsg_ping_and_quit():
    lines, records = session(b"NICK bot\r\nUSER u 0 * :R\r\nJOIN #a,#b key1\r\nPRIVMSG #a :go\r\n"
                             b"NOTICE boss :hi\r\nPING :123\r\nQUIT :bye\r\nPRIVMSG #a :after\r\n")
    assert ":bot!u@192.0.2.2 JOIN #a" in lines and ":bot!u@192.0.2.2 JOIN #b" in lines
    assert ":irc.example.net 353 bot = #a :@bot" in lines
    assert ":irc.example.net PONG irc.example.net :123" in lines
    assert lines[-1] == "ERROR :Closing Link: 192.0.2.2 (Quit: bye)"
    assert [(r["command"], r.get("channel") or r.get("target"), r.get("key") or r.get("text")) for r in records[1:]] \
        == [("JOIN", "#a", "key1"), ("JOIN", "#b", None), ("PRIVMSG", "#a", "go"), ("NOTICE", "boss", "hi"),
            ("QUIT", None, None)]


def test_commands_before_registration_are_refused_and_unknown_ones_named():
    lines, records = session(b"JOIN #a\r\nNICK bot\r\nUSER u 0 * :R\r\nFROB x\r\n")
    assert lines[0] == ":irc.example.net 451 * :You have not registered"
    assert lines[-1] == ":irc.example.net 421 bot FROB :Unknown command"
    assert [r["command"] for r in records] == ["register"]


def test_a_line_longer_than_the_limit_ends_the_session():
    lines, _ = session(b"NICK " + b"x" * (irc.MAX_LINE + 10))
    assert lines == []
