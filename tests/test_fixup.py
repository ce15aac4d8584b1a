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


def make(on_new=None, max_entries=100):
    table = ConversationTable(max_entries=max_entries, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)
    decide = partial(
        decide_mod.decide,
        listeners=LISTEN,
        is_bound=lambda p, port: (p, port) in BOUND,
        left_alone=lambda p, port: False,
    )
    return FixUp(table, decide, Counters(), on_new=on_new)


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
    assert key == ConversationKey(TCP, seg.src, 40000, seg.dst) and isinstance(key, ConversationKey)
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
    assert f.table.get(ConversationKey(TCP, V4_CLIENT, 40000, V4_LOCAL), 5.0).closing_since == 5.0
    assert ports(f.outgoing(server(1337, 40000, FIN | ACK), 6.0)) == (80, 40000)  # grace
    assert f.table.expire(7.0) == 1
    assert f.outgoing(server(1337, 40000, ACK), 7.1) is None
    assert f.table.stats.evicted_closed == 1


def test_listener_reset_starts_the_grace():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    assert ports(f.outgoing(server(1337, 40000, RST | ACK), 1.0)) == (80, 40000)
    assert f.table.expire(3.0) == 1


def test_port_reuse_by_a_new_syn_replaces_the_mapping():
    f = make()
    f.incoming(client(40000, 80, SYN), 0.0)
    f.incoming(client(40000, 80, RST), 1.0)
    out = f.incoming(client(40000, 81, SYN), 1.5)  # same client port, other service
    assert ports(out) == (40000, 1337)
    assert ports(f.outgoing(server(1337, 40000, SYN | ACK), 1.6)) == (81, 40000)
    assert f.counters.new_conversations == 2
    assert f.table.expire(5.0) == 0  # the old closing state went with the old mapping


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


def test_udp_to_another_port_replaces_the_mapping():
    f = make()
    f.incoming(client(5353, 53, protocol=UDP), 0.0)
    assert ports(f.incoming(client(5353, 123, protocol=UDP), 0.1)) == (5353, 1338)
    assert ports(f.outgoing(server(1338, 5353, protocol=UDP), 0.2)) == (123, 5353)
    # then straight to the listener: no divert, and no stale mapping left
    assert f.incoming(client(5353, 1338, protocol=UDP), 0.3) is None
    assert f.outgoing(server(1338, 5353, protocol=UDP), 0.4) is None


def test_decide_failure_counts_an_error_and_passes():
    f = make()

    def broken(protocol, dport):
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
