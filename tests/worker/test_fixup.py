"""FixUp end to end: client packets to the listener, replies back to the port."""
from __future__ import annotations

from functools import partial

import pytest

from builders import V4_CLIENT, V4_LOCAL, V6_CLIENT, V6_LOCAL, checksum_valid, packet
from nftdivert.worker import decide as decide_mod
from nftdivert.netlink.ctnetlink import Entry
from nftdivert.worker.conversations import Binding, ConversationTable, RouteKey
from nftdivert.worker.fixup import DROP, RESOLVE_TRIES, Counters, FixUp
from nftdivert.worker.packet import ACK, FIN, RST, SYN, TCP, UDP, parse

LISTEN = {TCP: 1337, UDP: 1338}
BOUND = {(TCP, 22)}


def make(on_new=None, max_entries=100, is_local=None, resolve=None, clear=None):
    table = ConversationTable(max_entries=max_entries, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)
    decide = partial(
        decide_mod.decide,
        listeners=LISTEN,
        is_bound=lambda p, addr, port: (p, port) in BOUND,
        left_alone=lambda p, port: False,
    )
    return FixUp(table, decide, Counters(), on_new=on_new, is_local=is_local, resolve=resolve, clear=clear)


class Conntrack:
    """Stands in for conntrack's table: entries by reply tuple, as the kernel
    would hold them after remapping a client port; counts the questions."""

    def __init__(self):
        self.entries = {}
        self.asked = []

    def add(self, protocol, client_port, reply_port, original_dst, original_port, *, seen_reply=False, version=4):
        client, local = (V4_CLIENT, V4_LOCAL) if version == 4 else (V6_CLIENT, V6_LOCAL)
        self.entries[(version, protocol, client, reply_port, local, original_port)] = Entry(
            client, client_port, original_dst, original_port, 7, seen_reply)

    def __call__(self, *reply_tuple):
        self.asked.append(reply_tuple)
        return self.entries.get(reply_tuple)


def client(sport, dport, flags=ACK, payload=b"", protocol=TCP, version=4):
    c, l = (V4_CLIENT, V4_LOCAL) if version == 4 else (V6_CLIENT, V6_LOCAL)
    return packet(version, protocol, c, l, sport, dport, payload, flags=flags)


def server(sport, dport, flags=ACK, payload=b"", protocol=TCP, version=4):
    c, l = (V4_CLIENT, V4_LOCAL) if version == 4 else (V6_CLIENT, V6_LOCAL)
    return packet(version, protocol, l, c, sport, dport, payload, flags=flags)


def ports(data):
    seg = parse(data)
    return seg.sport, seg.dport


def balanced(c: Counters):
    return c.seen == c.rewritten + c.passed + c.malformed + c.dropped + c.errors + c.stale_answers


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_conversation(version):
    seen = []
    f = make(on_new=seen.append)
    out = f.incoming(client(40000, 80, SYN, version=version), 1.0, indev=3)
    assert ports(out) == (40000, 1337) and checksum_valid(out)
    assert seen == []  # TCP is announced at the listener's SYN/ACK

    reply = f.outgoing(server(1337, 40000, SYN | ACK, version=version), 1.1)
    assert ports(reply) == (80, 40000) and checksum_valid(reply)
    [conv] = seen
    seg = parse(out)
    assert conv.route == RouteKey(TCP, seg.src, 40000, seg.dst, 80) and isinstance(conv.route, RouteKey)
    assert conv.binding == Binding(TCP, seg.src, 40000, seg.dst)
    assert (conv.listener_port, conv.reply_port, conv.created, conv.indev, conv.original) == (1337, 40000, 1.0, 3, None)

    data = f.incoming(client(40000, 80, ACK, b"GET /", version=version), 1.2)
    assert ports(data) == (40000, 1337) and checksum_valid(data)
    reply = f.outgoing(server(1337, 40000, ACK, b"200 OK", version=version), 1.3)
    assert ports(reply) == (80, 40000) and checksum_valid(reply)

    c = f.counters
    assert (c.seen, c.rewritten, c.new_conversations, c.passed) == (4, 4, 1, 0) and balanced(c)


def test_udp_any_datagram_starts_and_replies_are_restored():
    seen = []
    f = make(on_new=seen.append)
    out = f.incoming(client(5353, 53, payload=b"q", protocol=UDP), 0.0)
    assert ports(out) == (5353, 1338) and checksum_valid(out)
    assert len(seen) == 1  # UDP is announced at once: a listener need not answer
    reply = f.outgoing(server(1338, 5353, payload=b"a", protocol=UDP), 0.1)
    assert ports(reply) == (53, 5353) and checksum_valid(reply)


BROADCAST = bytes([203, 0, 113, 255])  # of V4_LOCAL's link


def test_a_broadcast_conversation_gets_the_reply_from_our_unicast_address_restored():
    f = make(is_local=lambda addr: addr == V4_LOCAL, max_entries=2)
    to_all = packet(4, UDP, V4_CLIENT, BROADCAST, 5353, 137, b"q")
    out = f.incoming(to_all, 0.0)
    assert ports(out) == (5353, 1338) and checksum_valid(out)
    # The listener answers from the address the kernel picks, not the broadcast one.
    reply = f.outgoing(packet(4, UDP, V4_LOCAL, V4_CLIENT, 1338, 5353, b"a"), 0.1)
    assert ports(reply) == (137, 5353) and checksum_valid(reply)
    # Gone from the table (two newer conversations pushed it out): no longer restored.
    f.incoming(client(1, 53, payload=b"q", protocol=UDP), 0.2)
    f.incoming(client(2, 53, payload=b"q", protocol=UDP), 0.3)
    assert f.outgoing(packet(4, UDP, V4_LOCAL, V4_CLIENT, 1338, 5353, b"a"), 0.4) is None


def test_a_reply_from_another_address_is_not_taken_for_a_unicast_conversation():
    f = make(is_local=lambda addr: addr == V4_LOCAL)
    f.incoming(client(5353, 53, payload=b"q", protocol=UDP), 0.0)
    elsewhere = bytes([192, 0, 2, 1])
    assert f.outgoing(packet(4, UDP, elsewhere, V4_CLIENT, 1338, 5353, b"a"), 0.1) is None


def test_unknown_reply_is_untouched():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert f.outgoing(server(1337, 40001), 0.1) is None  # other client port
    assert f.outgoing(server(1338, 40000), 0.1) is None  # not that conversation's listener
    assert f.outgoing(server(1337, 40000, protocol=UDP), 0.1) is None  # other protocol
    assert f.counters.passed == 3 and balanced(f.counters)


@pytest.mark.parametrize("version", [4, 6])
def test_truncated_copy_of_diverted_traffic_is_dropped(version):
    # Incoming, it would reach the unbound port (port unreachable ends the
    # conversation); outgoing, it would show the client the listener's port.
    f = make()
    big = client(5353, 53, payload=bytes(8000), protocol=UDP, version=version)
    assert f.incoming(big[:4016], 0.0) is DROP
    assert len(f.table) == 0
    assert f.counters.dropped == 1 and f.counters.unfit == {"truncated": 1}
    f.incoming(client(5353, 53, protocol=UDP, version=version), 0.0)
    assert f.outgoing(server(1338, 5353, payload=bytes(8000), protocol=UDP, version=version)[:4016], 0.1) is DROP
    # A reply of a conversation nobody diverted (a client of the listener's own port) goes on.
    assert f.outgoing(server(1338, 9999, payload=bytes(8000), protocol=UDP, version=version)[:4016], 0.1) is None
    c = f.counters
    assert (c.dropped, c.malformed, c.unfit) == (2, 1, {"truncated": 3}) and balanced(c)


def test_only_an_opener_starts_a_tcp_conversation():
    f = make()
    assert f.incoming(client(40000, 80, ACK), 0.0) is None
    assert f.incoming(client(40000, 80, SYN | ACK), 0.0) is None
    assert f.incoming(client(40000, 80, FIN | ACK), 0.0) is None
    assert len(f.table) == 0 and f.counters.passed == 3


@pytest.mark.parametrize(
    ("protocol", "dport"),
    [(TCP, 22), (TCP, 1337), (UDP, 1338)],  # bound; already the listener (both protocols)
)
def test_not_diverted(protocol, dport):
    f = make()
    flags = SYN if protocol == TCP else 0
    assert f.incoming(client(40000, dport, flags, protocol=protocol), 0.0) is None
    assert len(f.table) == 0 and f.counters.new_conversations == 0


def test_fin_then_expire():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    out = f.incoming(client(40000, 80, FIN | ACK), 5.0)
    assert ports(out) == (40000, 1337)  # a FIN is still rewritten
    assert f.table.get(Binding(TCP, V4_CLIENT, 40000, V4_LOCAL), 5.0).closing_since == 5.0
    assert ports(f.outgoing(server(1337, 40000, FIN | ACK), 6.0)) == (80, 40000)  # grace
    assert f.table.expire(7.0) == 1
    assert f.outgoing(server(1337, 40000, ACK), 7.1) is None
    assert f.table.stats.evicted_closed == 1


def test_listener_reset_starts_the_grace():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert ports(f.outgoing(server(1337, 40000, RST | ACK), 1.0)) == (80, 40000)
    assert f.table.expire(3.0) == 1


def test_port_reuse_while_the_old_conversation_closes_gets_an_alias():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    f.outgoing(server(1337, 40000, SYN | ACK), 0.1)
    f.incoming(client(40000, 80, RST), 1.0)
    out = f.incoming(client(40000, 81, SYN), 1.5)  # same client port, other service
    assert ports(out) == (40001, 1337) and checksum_valid(out)
    assert ports(f.outgoing(server(1337, 40001, SYN | ACK), 1.6)) == (81, 40000)
    assert f.counters.new_conversations == 2 and f.counters.port_clashes == 1
    assert f.table.expire(5.0) == 1  # only the closed one goes


def test_a_client_port_whose_listener_closed_first_gets_an_alias_after_the_grace():
    """HTTP: the server closes first, so its socket waits in TIME_WAIT long
    after the grace. A new conversation from that client port to another
    destination must not reach it (a stale ACK instead of a SYN/ACK)."""
    f = make()
    f.incoming(client(41000, 80, SYN), 0.0)
    f.outgoing(server(1337, 41000, SYN | ACK), 0.1)
    f.outgoing(server(1337, 41000, FIN | ACK), 0.2)  # the listener closes first
    f.incoming(client(41000, 80, FIN | ACK), 0.3)
    f.outgoing(server(1337, 41000, ACK), 0.3)
    assert f.table.expire(12.0) == 1 and len(f.table) == 0
    out = f.incoming(client(41000, 6000, SYN), 12.0)
    alias = ports(out)[0]
    assert alias != 41000 and ports(out)[1] == 1337 and checksum_valid(out)
    assert ports(f.outgoing(server(1337, alias, SYN | ACK), 12.1)) == (6000, 41000)  # restored
    assert f.counters.port_clashes == 1


def test_a_client_port_whose_client_closed_first_is_used_again_as_is():
    f = make()
    f.incoming(client(41000, 80, SYN), 0.0)
    f.outgoing(server(1337, 41000, SYN | ACK), 0.1)
    f.incoming(client(41000, 80, FIN | ACK), 0.2)  # the client closes first: no TIME_WAIT at the listener
    f.outgoing(server(1337, 41000, FIN | ACK), 0.3)
    assert f.table.expire(12.0) == 1
    assert ports(f.incoming(client(41000, 6000, SYN), 12.0)) == (41000, 1337)
    assert f.counters.port_clashes == 0


@pytest.mark.parametrize("protocol", [TCP, UDP])
@pytest.mark.parametrize("version", [4, 6])
def test_one_client_port_towards_two_destinations_at_once(protocol, version):
    # Linux reuses an ephemeral port for connections to different
    # destinations; at the listener both would be one socket.
    f = make()
    flags = SYN if protocol == TCP else 0
    a = f.incoming(client(40000, 80, flags, protocol=protocol, version=version), 0.0)
    b = f.incoming(client(40000, 443, flags, protocol=protocol, version=version), 0.1)
    listener = 1337 if protocol == TCP else 1338
    assert ports(a) == (40000, listener) and ports(b) == (40001, listener)
    assert checksum_valid(a) and checksum_valid(b)
    reply_flags = SYN | ACK if protocol == TCP else 0
    ra = f.outgoing(server(listener, 40000, reply_flags, protocol=protocol, version=version), 0.2)
    rb = f.outgoing(server(listener, 40001, reply_flags, protocol=protocol, version=version), 0.2)
    assert ports(ra) == (80, 40000) and ports(rb) == (443, 40000)
    assert checksum_valid(ra) and checksum_valid(rb)
    later = f.incoming(client(40000, 443, ACK if protocol == TCP else 0, protocol=protocol, version=version), 0.3)
    assert ports(later) == (40001, listener)
    assert f.counters.port_clashes == 1


def test_syn_reopening_a_closing_conversation_starts_afresh():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    f.outgoing(server(1337, 40000, SYN | ACK), 0.1)
    f.incoming(client(40000, 80, FIN | ACK), 1.0)
    f.incoming(client(40000, 80, SYN), 1.5)
    f.outgoing(server(1337, 40000, SYN | ACK), 1.6)
    assert f.counters.new_conversations == 2
    assert f.table.expire(5.0) == 0


def test_retransmitted_syn_keeps_the_conversation():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert ports(f.incoming(client(40000, 80, SYN), 1.0)) == (40000, 1337)
    f.outgoing(server(1337, 40000, SYN | ACK), 1.1)
    f.outgoing(server(1337, 40000, SYN | ACK), 1.2)  # and a retransmitted SYN/ACK
    assert f.counters.new_conversations == 1 and len(f.table) == 1


def test_mid_stream_packet_to_another_port_is_not_misrouted():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert f.incoming(client(40000, 22, ACK), 0.1) is None
    assert ports(f.outgoing(server(1337, 40000), 0.2)) == (80, 40000)  # mapping intact


def test_udp_socket_talking_to_many_ports_keeps_every_mapping():
    # One unconnected UDP socket scanning services: each reply must come
    # back from the port it went to.
    f = make()
    for n, dport in enumerate((53, 123, 161)):
        assert ports(f.incoming(client(5353, dport, protocol=UDP), n / 10)) == (5353 + n, 1338)
    for n, dport in enumerate((53, 123, 161)):
        assert ports(f.outgoing(server(1338, 5353 + n, protocol=UDP), 1.0)) == (dport, 5353)
    assert f.counters.port_clashes == 2 and len(f.table) == 3


def test_decide_failure_counts_an_error_and_passes():
    f = make()

    def broken(protocol, daddr, dport):
        raise RuntimeError("boom")

    f.decide = broken
    assert f.incoming(client(40000, 80, SYN), 0.0) is None
    assert f.counters.errors == 1 and isinstance(f.last_error, RuntimeError)
    assert balanced(f.counters)


def test_hook_failure_still_rewrites():
    def hook(conv):
        raise ValueError("log broke")

    f = make(on_new=hook)
    out = f.incoming(client(5353, 53, protocol=UDP), 0.0)
    assert ports(out) == (5353, 1338)
    assert f.counters.hook_errors == 1 and f.counters.errors == 0 and f.counters.rewritten == 1


def test_not_bytes_at_all():
    f = make()
    assert f.incoming(None, 0.0) is None  # type: ignore[arg-type]
    assert f.outgoing(12, 0.0) is None  # type: ignore[arg-type]
    assert f.counters.errors == 2 and balanced(f.counters)


def test_rewritten_conversation_is_touched_by_both_directions():
    f = make()
    f.incoming(client(5353, 53, protocol=UDP), 0.0)
    f.outgoing(server(1338, 5353, protocol=UDP), 9.0)
    assert f.table.expire(15.0) == 0  # reply at 9.0 kept it alive
    assert f.table.expire(19.0) == 1


# -- one client port towards several addresses on one port ------------------------------
# All share one route at -150; at input 100 the kernel gives all but the first
# another client port (X), which the listener then answers.

ADDR_A, ADDR_B = bytes([198, 51, 100, 90]), bytes([198, 51, 100, 91])


@pytest.mark.parametrize("protocol", [TCP, UDP])
@pytest.mark.parametrize("version", [4, 6])
def test_a_conversation_the_kernel_remapped_is_learned_from_conntrack(protocol, version):
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct)
    listener = LISTEN[protocol]
    opener, answer = (SYN, SYN | ACK) if protocol == TCP else (0, 0)
    kw = dict(protocol=protocol, version=version)
    a = f.incoming(client(5000, 4444, opener, **kw), 0.0, indev=3)
    b = f.incoming(client(5000, 4444, opener, **kw), 0.1)  # to another address: the same tuple here
    assert ports(a) == ports(b) == (5000, listener) and len(f.table) == 1

    # The first keeps its port: the listener answers 5000, restored without asking conntrack.
    assert ports(f.outgoing(server(listener, 5000, answer, **kw), 0.2)) == (4444, 5000)
    assert ct.asked == []
    # The second reached the listener as 5000 -> 41000 (NAT at input 100).
    ct.add(protocol, 5000, 41000, ADDR_B, 4444, version=version)
    rb = f.outgoing(server(listener, 41000, answer, **kw), 0.3)
    # Conntrack's reply tuple expects 41000; it turns that back into 5000 and the address into B.
    assert ports(rb) == (4444, 41000) and checksum_valid(rb)
    assert len(ct.asked) == 1 and ct.asked[0][3:] == (41000, ct.asked[0][4], 4444)
    assert ports(f.outgoing(server(listener, 41000, ACK if protocol == TCP else 0, **kw), 0.4)) == (4444, 41000)
    assert len(ct.asked) == 1  # learned once, then a binding like any other

    second = seen[-1]
    assert second.original == (ADDR_B, 4444) and second.route[2] == 5000 and second.indev == 3
    assert second.binding.client_port == 41000 and second.reply_port == 41000
    c = f.counters
    assert (c.new_conversations, c.kernel_remaps, c.port_clashes) == (2, 1, 0) and balanced(c)
    assert f.table.stats.routes == 1 and len(f.table) == 2


def test_fifty_conversations_on_one_route_each_get_their_own_destination():
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct)
    for i in range(50):
        f.incoming(client(5000, 4444, SYN), i)
    f.outgoing(server(1337, 5000, SYN | ACK), 50.0)
    for i in range(1, 50):
        ct.add(TCP, 5000, 30000 + i, bytes([198, 51, 100, i]), 4444)
        assert ports(f.outgoing(server(1337, 30000 + i, SYN | ACK), 50.0)) == (4444, 30000 + i)
    assert len(seen) == 50 and len(ct.asked) == 49
    assert [c.original for c in seen[1:]] == [(bytes([198, 51, 100, i]), 4444) for i in range(1, 50)]
    assert f.counters.kernel_remaps == 49 and f.table.stats.routes == 1


def test_a_shared_route_closes_from_the_listener_side_and_lives_while_one_conversation_does():
    ct = Conntrack()
    f = make(resolve=ct)
    f.incoming(client(5000, 4444, SYN), 0.0)
    f.incoming(client(5000, 4444, SYN), 0.0)
    f.outgoing(server(1337, 5000, SYN | ACK), 0.1)
    ct.add(TCP, 5000, 41000, ADDR_B, 4444)
    f.outgoing(server(1337, 41000, SYN | ACK), 0.1)
    # A client FIN on a shared route cannot be told apart: it closes nothing.
    assert ports(f.incoming(client(5000, 4444, FIN | ACK), 1.0)) == (5000, 1337)
    assert f.table.expire(5.0) == 0
    # The listener closes the second; only it goes.
    f.outgoing(server(1337, 41000, FIN | ACK), 6.0)
    assert f.table.expire(8.0) == 1
    assert Binding(TCP, V4_CLIENT, 5000, V4_LOCAL) in f.table
    # Now the route has one conversation again: a client FIN is its.
    f.incoming(client(5000, 4444, FIN | ACK), 9.0)
    assert f.table.expire(11.0) == 1
    assert len(f.table) == 0 and f.table.stats.routes == 0
    assert f.incoming(client(5000, 4444, ACK), 12.0) is None  # the route went with it


def test_a_reply_conntrack_has_seen_answered_before_is_restored_but_not_announced_again():
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct, max_entries=2)
    f.incoming(client(5000, 4444, SYN), 0.0)
    f.outgoing(server(1337, 5000, SYN | ACK), 0.1)
    f.incoming(client(5001, 4444, SYN), 0.2)
    f.outgoing(server(1337, 5001, SYN | ACK), 0.3)
    ct.add(TCP, 5000, 41000, ADDR_B, 4444, seen_reply=True)
    f.incoming(client(5000, 4444, SYN), 0.4)
    f.incoming(client(5000, 4444, ACK), 0.5)
    # The table (cap 2) forgot it; conntrack has answered it before.
    assert ports(f.outgoing(server(1337, 41000, ACK), 0.6)) == (4444, 41000)
    assert len(seen) == 2 and f.counters.kernel_remaps == 0


def test_unplaced_replies_ask_conntrack_a_bounded_number_of_times():
    ct = Conntrack()
    f = make(resolve=ct)
    assert f.outgoing(server(1337, 41000, ACK), 0.0) is None
    assert ct.asked == []  # no route of this client: nothing to ask about
    for port in range(100, 200):
        f.incoming(client(5000 + port, port, SYN), 0.0)
    assert f.outgoing(server(1337, 41000, ACK), 0.1) is None
    assert len(ct.asked) == RESOLVE_TRIES
    # Most recently used original ports first.
    assert [q[5] for q in ct.asked[:3]] == [199, 198, 197]
    assert f.outgoing(server(1337, 41000, ACK), 0.2) is None
    assert len(ct.asked) == RESOLVE_TRIES  # not asked again at once
    f.outgoing(server(1337, 41000, ACK), 1.5)
    assert len(ct.asked) == 2 * RESOLVE_TRIES
    assert f.counters.passed == 4 and balanced(f.counters)


def test_an_entry_of_a_route_the_worker_does_not_hold_is_not_bound():
    ct = Conntrack()
    f = make(resolve=ct)
    f.incoming(client(5000, 4444, SYN), 0.0)
    ct.add(TCP, 6000, 41000, ADDR_B, 4444)  # client port 6000: no route of ours
    assert f.outgoing(server(1337, 41000, SYN | ACK), 0.1) is None
    assert len(f.table) == 1


def test_the_listener_accepting_on_a_closing_binding_is_a_new_conversation():
    """The client reopens its port towards the same address while the first
    conversation closes on a shared route: conntrack names the new one."""
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct)
    f.incoming(client(5000, 4444, SYN), 0.0)
    f.outgoing(server(1337, 5000, SYN | ACK), 0.1)
    f.incoming(client(5000, 4444, SYN), 0.2)
    ct.add(TCP, 5000, 41000, ADDR_B, 4444)
    f.outgoing(server(1337, 41000, SYN | ACK), 0.3)
    f.outgoing(server(1337, 5000, FIN | ACK), 1.0)  # the first closes
    f.incoming(client(5000, 4444, SYN), 2.0)  # shared route: routed, not started afresh
    ct.add(TCP, 5000, 5000, ADDR_A, 4444)
    assert ports(f.outgoing(server(1337, 5000, SYN | ACK), 2.1)) == (4444, 5000)
    assert [c.original for c in seen] == [None, (ADDR_B, 4444), (ADDR_A, 4444)]
    assert f.table.get(Binding(TCP, V4_CLIENT, 5000, V4_LOCAL), 2.2).closing_since is None
    assert f.counters.kernel_remaps == 1


def _closed_by_client(f, sport, dport, now):
    f.incoming(client(sport, dport, SYN), now)
    f.outgoing(server(1337, sport, SYN | ACK), now)
    f.incoming(client(sport, dport, FIN | ACK), now)


def test_a_remap_onto_a_closing_conversations_port_is_not_taken_for_that_conversation():
    """The kernel remaps a new conversation (its reply tuple is held by an
    older one, in TIME_WAIT) to a client port the table holds as closing.
    Conntrack's entry of that closing conversation has had its reply; the new
    one's has not: the SYN/ACK is the new one's (the bench's timed-out connect)."""
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct)
    _closed_by_client(f, 5001, 4445, 0.0)
    ct.add(TCP, 5001, 5001, ADDR_A, 4445, seen_reply=True)
    _closed_by_client(f, 5000, 4444, 0.1)
    ct.add(TCP, 5000, 5000, ADDR_A, 4444, seen_reply=True)
    assert ports(f.incoming(client(5000, 4444, SYN), 1.0)) == (5000, 1337)  # to ADDR_B: the same tuple here
    ct.add(TCP, 5000, 5001, ADDR_B, 4444)  # NAT at input 100 gave it 5001
    for now in (1.1, 2.1, 4.1):  # the SYN/ACK, and its retransmissions
        assert ports(f.outgoing(server(1337, 5001, SYN | ACK), now)) == (4444, 5001)
    assert seen[-1].original == (ADDR_B, 4444) and f.counters.kernel_remaps == 1


def test_a_remap_onto_a_closing_conversations_alias_is_found_by_the_alias():
    ct, seen = Conntrack(), []
    f = make(on_new=seen.append, resolve=ct)
    f.incoming(client(5002, 80, SYN), 0.0)
    assert ports(f.incoming(client(5002, 81, SYN), 0.0)) == (5003, 1337)  # an alias
    f.outgoing(server(1337, 5003, SYN | ACK), 0.0)
    f.incoming(client(5002, 81, FIN | ACK), 0.1)
    ct.add(TCP, 5002, 5002, ADDR_A, 81, seen_reply=True)
    _closed_by_client(f, 5000, 4444, 0.2)
    f.incoming(client(5000, 4444, SYN), 1.0)
    ct.add(TCP, 5000, 5003, ADDR_B, 4444)  # the kernel gave it 5003: the alias
    assert ports(f.outgoing(server(1337, 5003, SYN | ACK), 1.1)) == (4444, 5003)
    assert seen[-1].original == (ADDR_B, 4444)


# A stale answer: the kernel remapped a new conversation's client port onto a
# binding where a listener socket lingers in TIME_WAIT, and that socket
# answered the SYN with a bare ACK of its old conversation.


class Clear:
    """Stands in for worker/stale.py: records what it was asked to clear."""

    def __init__(self, result="socket"):
        self.result = result
        self.asked = []

    def __call__(self, answer, entry, original_port):
        self.asked.append((answer.dport, entry.dst, original_port))
        return self.result


def _remapped_onto(f, ct, old_port, *, forget):
    """An old conversation from `old_port` whose listener closed first; then two
    conversations from client port 5000 to two addresses on 4444: the second
    is remapped (NAT at input) onto `old_port`. `forget`: the old conversation
    has left the table (its socket lingers), else it is still closing there."""
    f.incoming(client(old_port, 80, SYN), 0.0)
    f.outgoing(server(1337, old_port, SYN | ACK), 0.0)
    f.outgoing(server(1337, old_port, FIN | ACK), 0.1)  # the listener closes first
    f.incoming(client(old_port, 80, FIN | ACK), 0.1)
    assert ports(f.outgoing(server(1337, old_port, ACK), 0.1)) == (80, old_port)  # its last ACK: not asked about
    assert ct.asked == []
    if forget:
        f.table.expire(5.0)  # past close_grace: the binding lingers
        assert (TCP, V4_CLIENT, old_port, V4_LOCAL) not in f.table
    f.incoming(client(5000, 4444, SYN), 5.0)
    f.outgoing(server(1337, 5000, SYN | ACK), 5.0)
    f.incoming(client(5000, 4444, SYN), 5.1)  # to another address: the kernel gives it old_port
    ct.add(TCP, 5000, old_port, ADDR_B, 4444)


@pytest.mark.parametrize("forget", [True, False], ids=["lingering", "closing"])
def test_a_stale_answer_to_a_remapped_conversation_is_dropped_and_its_socket_cleared(forget):
    ct, clear, seen = Conntrack(), Clear(), []
    f = make(on_new=seen.append, resolve=ct, clear=clear)
    _remapped_onto(f, ct, 700, forget=forget)
    assert f.outgoing(server(1337, 700, ACK), 5.1) is DROP  # the old socket's ACK
    assert clear.asked == [(700, ADDR_B, 4444)]
    c = f.counters
    assert (c.stale_answers, c.sockets_closed, c.entries_deleted) == (1, 1, 0) and balanced(c)
    assert (TCP, V4_CLIENT, 700, V4_LOCAL) not in f.table  # its socket is gone
    # The client's SYN again, answered now: learned, announced once, restored.
    f.incoming(client(5000, 4444, SYN), 6.1)
    assert ports(f.outgoing(server(1337, 700, SYN | ACK), 6.1)) == (4444, 700)
    assert seen[-1].original == (ADDR_B, 4444) and c.kernel_remaps == 1
    assert f.table.free_alias((TCP, V4_CLIENT, 700, V4_LOCAL, 9)) != 700  # held by the new conversation


def test_a_stale_answer_whose_entry_was_deleted_instead_is_dropped_too():
    ct, clear = Conntrack(), Clear("entry")
    f = make(resolve=ct, clear=clear)
    _remapped_onto(f, ct, 700, forget=True)
    assert f.outgoing(server(1337, 700, ACK), 5.1) is DROP
    assert (f.counters.stale_answers, f.counters.sockets_closed, f.counters.entries_deleted) == (1, 0, 1)


def test_a_stale_answer_nothing_could_clear_goes_on_as_before():
    ct = Conntrack()
    f = make(resolve=ct, clear=Clear(None))
    _remapped_onto(f, ct, 700, forget=True)
    assert ports(f.outgoing(server(1337, 700, ACK), 5.1)) == (4444, 700)
    assert f.counters.stale_answers == 0 and balanced(f.counters)


def test_an_answer_to_a_conversation_conntrack_has_seen_answered_is_not_stale():
    """A lingering socket's ACK to a retransmitted FIN of its own conversation:
    that entry has had its reply."""
    ct, clear = Conntrack(), Clear()
    f = make(resolve=ct, clear=clear)
    f.incoming(client(700, 80, SYN), 0.0)
    f.outgoing(server(1337, 700, SYN | ACK), 0.0)
    f.outgoing(server(1337, 700, FIN | ACK), 0.1)
    f.incoming(client(700, 80, FIN | ACK), 0.1)
    f.outgoing(server(1337, 700, ACK), 0.1)
    ct.add(TCP, 700, 700, ADDR_A, 80, seen_reply=True)
    f.incoming(client(700, 80, FIN | ACK), 0.5)  # retransmitted
    assert ports(f.outgoing(server(1337, 700, ACK), 0.5)) == (80, 700)
    assert clear.asked == [] and f.counters.stale_answers == 0
