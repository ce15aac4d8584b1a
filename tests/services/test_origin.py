"""The original destination as the listener asks for it: table, conntrack, fallback, and the pipe."""

from __future__ import annotations

import multiprocessing
import time

from nftdivert.services import origin
from nftdivert.observers.conntrack import ConntrackError, Entry
from nftdivert.worker.conversations import ConversationTable, RouteKey
from nftdivert.worker.packet import TCP

CLIENT, LOCAL, ASKED = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1]), bytes([203, 0, 113, 9])


def table_with(original_port: int, listener_port: int) -> ConversationTable:
    table = ConversationTable(16, 60, 60, 5)
    table.open(RouteKey(TCP, CLIENT, 40000, LOCAL, original_port), listener_port, 0.0)
    return table


class Asked:
    """Conntrack's lookup, recording what it was asked."""

    def __init__(self, answer=None, error=None) -> None:
        self.answer, self.error, self.calls = answer, error, []

    def __call__(self, *args):
        self.calls.append(args)
        if self.error is not None:
            raise self.error
        return self.answer


def test_a_diverted_conversation_answers_conntracks_address_and_the_routes_port():
    entry = Asked(Entry(CLIENT, 40000, ASKED, 25, 1, False))
    got = origin.original(table_with(25, 1), entry, ("::ffff:10.0.0.2", 40000), ("::ffff:10.0.0.1", 1))
    assert got == ("203.0.113.9", 25)
    # Asked by the reply tuple conntrack holds: the local address on the original port.
    assert entry.calls == [(4, TCP, CLIENT, 40000, LOCAL, 25)]


def test_a_diverted_conversation_without_conntrack_keeps_the_original_port():
    got = origin.original(table_with(110, 1), Asked(error=ConntrackError(5, "no")), ("10.0.0.2", 40000),
                          ("10.0.0.1", 1))
    assert got == ("10.0.0.1", 110)


def test_a_bound_port_asks_conntrack_by_the_listeners_own_tuple():
    entry = Asked(Entry(CLIENT, 40000, ASKED, 80, 1, False))
    got = origin.original(table_with(25, 1), entry, ("10.0.0.2", 40001), ("10.0.0.1", 80))
    assert got == ("203.0.113.9", 80) and entry.calls == [(4, TCP, CLIENT, 40001, LOCAL, 80)]


def test_a_bound_port_unknown_to_conntrack_is_the_local_address():
    assert origin.original(None, Asked(), ("10.0.0.2", 40001), ("10.0.0.1", 80)) == ("10.0.0.1", 80)


def test_peek_does_not_reorder_the_table():
    table = table_with(25, 1)
    table.open(RouteKey(TCP, CLIENT, 40001, LOCAL, 26), 1, 1.0)
    first = next(iter(table._entries))
    assert table.peek(first) is not None and next(iter(table._entries)) == first


def test_the_pipe_answers_and_a_silent_parent_is_unknown_within_the_timeout():
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    server = origin.Server(parent)
    server.lookup = lambda client, local: ("203.0.113.9", local[1] + 1)
    server.start()
    client = origin.Client(child, timeout=2.0)
    assert client.ask(("10.0.0.2", 40000, 0, 0), ("10.0.0.1", 24)) == ("203.0.113.9", 25)

    slow = []
    server.lookup = lambda client, local: slow.append(1) or time.sleep(0.6) or ("203.0.113.9", 1)
    client._timeout = 0.2
    assert client.ask(("10.0.0.2", 40000), ("10.0.0.1", 24)) is None
    # The late answer is dropped; the next question gets its own.
    server.lookup = lambda client, local: ("203.0.113.9", 2)
    client._timeout = 2.0
    assert client.ask(("10.0.0.2", 40000), ("10.0.0.1", 24)) == ("203.0.113.9", 2)
    assert slow
    child.close()
    server.join(2)
    server.close()
