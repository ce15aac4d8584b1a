"""FixUp end to end: client packets to the listener, replies back to the port."""
from __future__ import annotations

from functools import partial

import pytest

from builders import V4_CLIENT, V4_LOCAL, V6_CLIENT, V6_LOCAL, checksum_valid, packet
from nftdivert import decide as decide_mod
from nftdivert.conversations import ConversationKey, ConversationTable
from nftdivert.fixup import Counters, FixUp
from nftdivert.packet import ACK, FIN, RST, SYN, TCP, UDP, parse

LISTEN = {TCP: 1337, UDP: 1338}
BOUND = {(TCP, 22)}


def make(on_new=None, max_entries=100, is_local=None):
    table = ConversationTable(max_entries=max_entries, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)
    decide = partial(
        decide_mod.decide,
        listeners=LISTEN,
        is_bound=lambda p, addr, port: (p, port) in BOUND,
        left_alone=lambda p, port: False,
    )
    return FixUp(table, decide, Counters(), on_new=on_new, is_local=is_local)


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
    return c.seen == c.rewritten + c.passed + c.malformed + c.errors


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_conversation(version):
    seen = []
    f = make(on_new=lambda key, conv, seg: seen.append((key, conv, seg)))
    out = f.incoming(client(40000, 80, SYN, version=version), 1.0, indev=3)
    assert ports(out) == (40000, 1337) and checksum_valid(out)
    [(key, conv, seg)] = seen
    assert key == ConversationKey(TCP, seg.src, 40000, seg.dst, 80) and isinstance(key, ConversationKey)
    assert (conv.original_port, conv.listener_port, conv.created, conv.indev) == (80, 1337, 1.0, 3)
    assert seg.dport == 80

    reply = f.outgoing(server(1337, 40000, SYN | ACK, version=version), 1.1)
    assert ports(reply) == (80, 40000) and checksum_valid(reply)

    data = f.incoming(client(40000, 80, ACK, b"GET /", version=version), 1.2)
    assert ports(data) == (40000, 1337) and checksum_valid(data)
    reply = f.outgoing(server(1337, 40000, ACK, b"200 OK", version=version), 1.3)
    assert ports(reply) == (80, 40000) and checksum_valid(reply)

    c = f.counters
    assert (c.seen, c.rewritten, c.new_conversations, c.passed) == (4, 4, 1, 0) and balanced(c)


def test_udp_any_datagram_starts_and_replies_are_restored():
    f = make()
    out = f.incoming(client(5353, 53, payload=b"q", protocol=UDP), 0.0)
    assert ports(out) == (5353, 1338) and checksum_valid(out)
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


def test_truncated_copy_is_untouched():
    f = make()
    big = client(40000, 80, SYN, payload=bytes(5000))
    assert f.incoming(big[:4016], 0.0) is None
    assert len(f.table) == 0
    assert f.counters.malformed == 1 and f.counters.unfit == {"truncated": 1}
    f.incoming(client(40000, 80, SYN), 0.0)
    assert f.outgoing(server(1337, 40000, payload=bytes(5000))[:4016], 0.1) is None
    assert f.counters.unfit == {"truncated": 2}


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
    assert f.table.get(ConversationKey(TCP, V4_CLIENT, 40000, V4_LOCAL, 80), 5.0).closing_since == 5.0
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
    f.incoming(client(40000, 80, RST), 1.0)
    out = f.incoming(client(40000, 81, SYN), 1.5)  # same client port, other service
    assert ports(out) == (40001, 1337) and checksum_valid(out)
    assert ports(f.outgoing(server(1337, 40001, SYN | ACK), 1.6)) == (81, 40000)
    assert f.counters.new_conversations == 2 and f.counters.port_clashes == 1
    assert f.table.expire(5.0) == 1  # only the closed one goes


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
    f.incoming(client(40000, 80, FIN | ACK), 1.0)
    f.incoming(client(40000, 80, SYN), 1.5)
    assert f.counters.new_conversations == 2
    assert f.table.expire(5.0) == 0


def test_retransmitted_syn_keeps_the_conversation():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert ports(f.incoming(client(40000, 80, SYN), 1.0)) == (40000, 1337)
    assert f.counters.new_conversations == 1


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
    def hook(key, conv, seg):
        raise ValueError("log broke")

    f = make(on_new=hook)
    out = f.incoming(client(40000, 80, SYN), 0.0)
    assert ports(out) == (40000, 1337)
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
