"""The original destination as the listener asks for it: table, conntrack, fallback, and the pipe."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from nftdivert.services import origin
from nftdivert.netlink.ctnetlink import ConntrackError, Entry
from nftdivert.worker.conversations import ConversationTable, RouteKey
from nftdivert.worker.packet import TCP, UDP

REPO = Path(__file__).resolve().parents[2]
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
    assert got == ("203.0.113.9", 25, 40000)
    # Asked by the reply tuple conntrack holds: the local address on the original port.
    assert entry.calls == [(4, TCP, CLIENT, 40000, LOCAL, 25)]


def test_a_diverted_conversation_without_conntrack_keeps_the_original_port():
    got = origin.original(table_with(110, 1), Asked(error=ConntrackError(5, "no")), ("10.0.0.2", 40000),
                          ("10.0.0.1", 1))
    assert got == ("10.0.0.1", 110, 40000)


def test_a_bound_port_asks_conntrack_by_the_listeners_own_tuple():
    entry = Asked(Entry(CLIENT, 40000, ASKED, 80, 1, False))
    got = origin.original(table_with(25, 1), entry, ("10.0.0.2", 40001), ("10.0.0.1", 80))
    assert got == ("203.0.113.9", 80, 40000) and entry.calls == [(4, TCP, CLIENT, 40001, LOCAL, 80)]


def test_a_udp_conversation_is_found_under_its_own_protocol():
    table = ConversationTable(16, 60, 60, 5)
    table.open(RouteKey(UDP, CLIENT, 40000, LOCAL, 123), 1337, 0.0)
    entry = Asked(Entry(CLIENT, 40000, ASKED, 123, 1337, False))
    assert origin.original(table, entry, ("10.0.0.2", 40000), ("10.0.0.1", 1337), UDP) == ("203.0.113.9", 123, 40000)
    assert entry.calls == [(4, UDP, CLIENT, 40000, LOCAL, 123)]
    # The TCP conversation of the same tuple is another one: not in the table.
    assert origin.original(table, Asked(), ("10.0.0.2", 40000), ("10.0.0.1", 1337)) == ("10.0.0.1", 1337, 40000)


def test_a_bound_port_unknown_to_conntrack_is_the_local_address():
    assert origin.original(None, Asked(), ("10.0.0.2", 40001), ("10.0.0.1", 80)) == ("10.0.0.1", 80, 40001)


def test_the_answer_names_the_client_port_the_client_used_where_the_listener_saw_another():
    """The worker's alias: the listener sees another port, the route holds the client's own.
    The kernel's remap at input NAT: the reply tuple names the port the listener sees, the
    original tuple the client's (on a bound port, where the table knows nothing)."""
    table = table_with(25, 1)
    aliased = table.open(RouteKey(TCP, CLIENT, 40000, LOCAL, 26), 1, 1.0)  # the same client port, another port
    assert aliased.binding.client_port != 40000
    got = origin.original(table, Asked(), ("10.0.0.2", aliased.binding.client_port), ("10.0.0.1", 1))
    assert got == ("10.0.0.1", 26, 40000)
    entry = Asked(Entry(CLIENT, 40000, ASKED, 80, 1, False))
    assert origin.original(None, entry, ("10.0.0.2", 51234), ("10.0.0.1", 80)) == ("203.0.113.9", 80, 40000)


def test_a_datagram_the_kernel_remapped_is_found_by_the_clients_original_ports():
    """Queue path, UDP: the worker wrote the route's client port, the kernel then its own; the
    listener asks before it replies, so before the worker learns the port. Conntrack's reply
    tuple names the original port, which the client's routes hold."""
    table = ConversationTable(16, 60, 60, 5)
    table.open(RouteKey(UDP, CLIENT, 40000, LOCAL, 37), 1337, 0.0)

    def lookup(version, protocol, client, client_port, local, local_port):
        lookup.calls.append((client_port, local_port))
        return Entry(CLIENT, 40000, ASKED, 37, 1, False) if (client_port, local_port) == (51234, 37) else None
    lookup.calls = []
    got = origin.original(table, lookup, ("10.0.0.2", 51234), ("10.0.0.1", 1337), UDP)
    assert got == ("203.0.113.9", 37, 40000) and lookup.calls == [(51234, 1337), (51234, 37)]


@pytest.mark.parametrize("peer, asked, fields", [
    (("10.0.0.2", 40000), None, {"client": "10.0.0.2:40000", "client_address": "10.0.0.2"}),
    (("::ffff:10.0.0.2", 40000), origin.Asked("203.0.113.9", 80), {"client": "10.0.0.2:40000",
                                                                   "client_address": "10.0.0.2"}),
    (("10.0.0.2", 40000), origin.Asked("203.0.113.9", 80, 40000), {"client": "10.0.0.2:40000",
                                                                   "client_address": "10.0.0.2"}),
    (("2001:db8::2", 1025), origin.Asked("2001:db8::9", 80, 40000),
     {"client": "[2001:db8::2]:40000", "client_address": "2001:db8::2", "listener_client_port": 1025}),
])
def test_a_listeners_record_names_the_client_as_the_conversation_does(peer, asked, fields):
    assert origin.client_fields(peer, asked) == fields


def test_peek_does_not_reorder_the_table():
    table = table_with(25, 1)
    table.open(RouteKey(TCP, CLIENT, 40001, LOCAL, 26), 1, 1.0)
    first = next(iter(table._entries))
    assert table.peek(first) is not None and next(iter(table._entries)) == first


def test_the_pipe_answers_and_a_silent_parent_is_unknown_within_the_timeout():
    """The parent answers in a loop of its own (here a thread standing in for
    the worker's), whenever the pipe is readable; the listener awaits it."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    server = origin.Server(parent)
    server.lookup = lambda client, local, protocol: ("203.0.113.9", local[1] + 1)
    served = []

    def serve() -> None:  # the worker's loop: answer_pending whenever the pipe is readable
        while parent.poll(5) and server.answer_pending():
            served.append(1)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()

    async def questions():
        client = origin.Client(child, timeout=2.0)
        first = await client.ask(("10.0.0.2", 40000, 0, 0), ("10.0.0.1", 24))
        slow = []
        server.lookup = lambda client, local, protocol: slow.append(1) or time.sleep(0.6) or ("203.0.113.9", 1)
        client._timeout = 0.2
        late = await client.ask(("10.0.0.2", 40000), ("10.0.0.1", 24))
        # The late answer is dropped; the next question gets its own.
        server.lookup = lambda client, local, protocol: ("203.0.113.9", 2)
        client._timeout = 2.0
        third = await client.ask(("10.0.0.2", 40000), ("10.0.0.1", 24))
        return first, late, third, slow

    first, late, third, slow = asyncio.run(questions())
    assert first == ("203.0.113.9", 25, None) and late is None and third == ("203.0.113.9", 2, None) and slow
    child.close()
    loop.join(6)
    assert not loop.is_alive() and not server.answer_pending()  # the listener's end is gone
    server.close()


# ---- the kernel path: the accepted socket's own conntrack entry ---------------------------

_REDIRECTED = """
import json, socket, sys
from nftdivert.services import origin
srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind(("::", 7001))
srv.listen(8)
out = {}
for family, host in ((socket.AF_INET, "198.51.100.9"), (socket.AF_INET6, "2001:db8::9")):
    cli = socket.socket(family, socket.SOCK_STREAM)
    cli.connect((host, 4444))
    conn, _ = srv.accept()
    out[host] = origin.of_socket(conn)
    cli.close()
    conn.close()
plain = socket.create_connection(("127.0.0.1", 7001))
conn, _ = srv.accept()
out["direct"] = origin.of_socket(conn)
print(json.dumps(out))
"""


@pytest.mark.kernel
def test_of_socket_names_what_the_client_asked_for_through_the_redirect(host):
    """`redirect to :7001` (the kernel path's rule), IPv4 through a dual-stack
    socket and IPv6: conntrack names the address and port asked for, by the
    socket's own tuple. Not redirected: the listener's own address and port."""
    host.sh("ip link add d0 type veth peer name d1 && ip link set d1 up && ip link set d0 up && "
            "ip addr add 10.9.0.1/24 dev d0 && "
            "ip -6 addr add 2001:db8:9::1/64 dev d0 nodad && ip route add default dev d0 && "
            "ip -6 route add default dev d0")
    host.run("nft", "-f", "-", input="table inet t {\n chain o {\n type nat hook output priority -100;\n"
                                    " tcp dport 4444 redirect to :7001\n }\n}\n")
    got = json.loads(host.run(sys.executable, "-c", _REDIRECTED, env=dict(os.environ, PYTHONPATH=str(REPO))).stdout)
    assert got == {"198.51.100.9": ["198.51.100.9", 4444, None], "2001:db8::9": ["2001:db8::9", 4444, None],
                   "direct": ["127.0.0.1", 7001, None]}, got
