"""Which small service a TCP conversation gets."""

from __future__ import annotations

from nftdivert.services.small_services import kind_for


def test_irc_is_recognised_by_its_first_words_on_any_port():
    for first in (b"NICK bot\r\n", b"USER u 0 * :r\r\n", b"PASS x\r\n", b"CAP LS 302\r\n", b"nick bot\r\n"):
        assert kind_for(first, ("198.51.100.1", 4444)) == "irc"
        assert kind_for(first, None) == "irc"
    assert kind_for(b"NICKEL\r\n", ("198.51.100.1", 4444)) is None
    assert kind_for(b"USER bob\r\n", ("198.51.100.1", 110)) is None  # POP3's port: not IRC


def test_the_port_chooses_for_anything_else():
    assert kind_for(b"", ("198.51.100.1", 13)) == "daytime"
    assert kind_for(b"root\r\n", ("198.51.100.1", 79)) == "finger"
    assert kind_for(b"", ("198.51.100.1", 6697)) == "irc"
    assert kind_for(b"x", ("198.51.100.1", 7)) is None  # the echo is the listener's own
    assert kind_for(b"x", ("198.51.100.1", 4444)) is None
    assert kind_for(b"", None) is None
