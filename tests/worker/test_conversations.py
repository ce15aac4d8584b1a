"""ConversationTable: routes and bindings, idle expiry, FIN/RST grace, size cap, aliases."""
from __future__ import annotations

import pytest

from nftdivert.worker.conversations import ALIAS_FIRST, ALIAS_LAST, Binding, ConversationTable, RouteKey, TableStats
from nftdivert.worker.packet import TCP, UDP

CLIENT = bytes([198, 51, 100, 7])
LOCAL = bytes([203, 0, 113, 1])


def key(port, protocol=TCP, original=80):
    return RouteKey(protocol, CLIENT, port, LOCAL, original)


def binding(port, protocol=TCP):
    return Binding(protocol, CLIENT, port, LOCAL)


def table(max_entries=100):
    return ConversationTable(max_entries=max_entries, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)


def opened(t, port, now=0.0, protocol=TCP, original=80):
    return t.open(key(port, protocol, original), 1337, now)


def test_open_binds_the_clients_own_port_and_plain_tuples_find_it():
    t = table()
    c = opened(t, 1)
    assert c.binding == binding(1) and c.reply_port == 1 and c.route == key(1)
    assert t.route((TCP, CLIENT, 1, LOCAL, 80)).alias_port == 1
    assert t.from_listener_side((TCP, CLIENT, 1, LOCAL), 0.0) is c
    assert t.from_listener_side((UDP, CLIENT, 1, LOCAL), 0.0) is None
    assert t.route((TCP, CLIENT, 1, LOCAL, 81)) is None


def test_get_touches_last_seen():
    t = table()
    c = opened(t, 1)
    assert t.get(binding(1), 5.0) is c
    assert c.last_seen == 5.0 and c.created == 0.0


def test_idle_expiry_per_protocol_takes_routes_along():
    t = table()
    opened(t, 1, protocol=TCP)
    opened(t, 1, protocol=UDP)
    assert t.expire(9.9) == 0
    assert t.expire(10.0) == 1  # UDP idle reached
    assert binding(1, UDP) not in t and binding(1, TCP) in t
    assert t.route(key(1, UDP)) is None
    assert t.expire(59.9) == 0
    assert t.expire(60.0) == 1
    assert len(t) == 0
    assert t.stats == TableStats(size=0, routes=0, evicted_idle=2, evicted_closed=0, evicted_cap=0)


def test_traffic_keeps_a_conversation_alive():
    t = table()
    opened(t, 1, protocol=UDP)
    opened(t, 2, protocol=UDP)
    t.get(binding(1, UDP), 8.0)
    assert t.expire(12.0) == 1
    assert binding(1, UDP) in t and binding(2, UDP) not in t
    assert t.expire(18.0) == 1


def test_idle_scan_does_not_stop_at_a_long_lived_tcp_entry():
    t = table()
    opened(t, 1, 0.0, TCP)  # older, but TCP idles longer
    opened(t, 2, 1.0, UDP)
    assert t.expire(11.0) == 1
    assert binding(1, TCP) in t and binding(2, UDP) not in t


def test_fin_rst_grace():
    t = table()
    opened(t, 1)
    opened(t, 2)
    t.mark_closing(binding(1), 5.0)
    t.mark_closing(binding(1), 6.0)  # a later FIN does not extend the grace
    assert t.get(binding(1), 6.5).closing_since == 5.0  # still usable during grace
    assert t.expire(6.9) == 0
    assert t.expire(7.0) == 1
    assert binding(1) not in t and binding(2) in t and t.route(key(1)) is None
    assert t.stats.evicted_closed == 1 and t.stats.evicted_idle == 0


def test_mark_closing_unknown_binding_is_harmless():
    t = table()
    t.mark_closing(binding(9), 1.0)
    assert t.expire(100.0) == 0


def test_cap_evicts_the_least_recently_used():
    t = table(max_entries=3)
    for port in (1, 2, 3):
        opened(t, port, float(port))
    t.get(binding(1), 4.0)
    opened(t, 4, 5.0)
    assert [p for p in (1, 2, 3, 4) if binding(p) in t] == [1, 3, 4]
    assert t.route(key(2)) is None
    # 2 was evicted before it closed: its listener socket may still be there.
    assert t.stats == TableStats(size=3, routes=3, evicted_idle=0, evicted_closed=0, evicted_cap=1, lingering=1)


def test_cap_eviction_forgets_closing_state():
    t = table(max_entries=1)
    opened(t, 1)
    t.mark_closing(binding(1), 0.0)
    opened(t, 2, 1.0)
    assert t.expire(50.0) == 0  # nothing left to close, 2 not idle yet
    assert binding(2) in t


def test_open_again_replaces_the_route_and_its_closing_state():
    t = table()
    opened(t, 1)
    t.mark_closing(binding(1), 1.0)
    fresh = opened(t, 1, 2.0)
    assert len(t) == 1 and t.get(binding(1), 2.0) is fresh
    assert t.expire(10.0) == 0  # the old FIN no longer applies


def test_remove():
    t = table()
    c = opened(t, 1)
    t.mark_closing(binding(1), 0.0)
    assert t.remove(binding(1)) is c
    assert t.remove(binding(1)) is None
    assert t.expire(100.0) == 0 and t.stats.routes == 0


def test_bad_cap():
    with pytest.raises(ValueError):
        ConversationTable(max_entries=0, tcp_idle=1, udp_idle=1, close_grace=1)


# -- one route, several conversations (the kernel remapped the client port) --------

def test_conversations_learned_on_a_route_keep_it_alive_until_the_last_goes():
    t = table()
    first = opened(t, 5000, original=4444)
    route = t.route(key(5000, original=4444))
    second = t.learn(binding(40001), key(5000, original=4444), 40001, 1.0,
                     original=(bytes([198, 51, 100, 91]), 4444))
    third = t.learn(binding(40002), key(5000, original=4444), 40002, 1.0)
    assert route.members == {binding(5000), binding(40001), binding(40002)}
    assert (second.route, second.reply_port, second.listener_port) == (key(5000, original=4444), 40001, 1337)
    assert second.original == (bytes([198, 51, 100, 91]), 4444) and first.original is None
    # Only a route's one conversation can be touched from the incoming side.
    assert t.touch_route(key(5000, original=4444), route, 2.0) is None
    t.remove(binding(5000))
    t.remove(binding(40001))
    assert t.route(key(5000, original=4444)) is route
    assert t.touch_route(key(5000, original=4444), route, 3.0) is third and third.last_seen == 3.0
    t.remove(binding(40002))
    assert t.route(key(5000, original=4444)) is None
    assert t.recent_ports(TCP, CLIENT, LOCAL, 10) == []
    assert t.stats.routes == 0 and len(t) == 0


def test_learn_needs_the_route_and_replaces_what_held_the_binding():
    t = table()
    assert t.learn(binding(40001), key(5000), 40001, 0.0) is None
    opened(t, 5000)
    opened(t, 40001, original=443)  # another route holds listener-side port 40001
    learned = t.learn(binding(40001), key(5000), 40001, 1.0)
    assert t.from_listener_side(binding(40001), 1.0) is learned
    assert t.route(key(40001, original=443)) is None  # its only conversation was replaced
    # Replacing a conversation of the same route keeps the route through the swap.
    again = t.learn(binding(5000), key(5000), 5000, 2.0)
    assert t.route(key(5000)).members == {binding(5000), binding(40001)} and t.get(binding(5000), 2.0) is again


def test_recent_ports_most_recently_used_first():
    t = table()
    for original in (53, 123, 161):
        opened(t, 5353, protocol=UDP, original=original)
    assert t.recent_ports(UDP, CLIENT, LOCAL, 10) == [161, 123, 53]
    t.touch_route(key(5353, UDP, 53), t.route(key(5353, UDP, 53)), 1.0)
    assert t.recent_ports(UDP, CLIENT, LOCAL, 2) == [53, 161]
    opened(t, 6000, protocol=UDP, original=123)  # a second route on port 123
    t.remove(binding(t.route(key(5353, UDP, 123)).alias_port, UDP))
    assert 123 in t.recent_ports(UDP, CLIENT, LOCAL, 10)
    t.remove(binding(6000, UDP))
    assert t.recent_ports(UDP, CLIENT, LOCAL, 10) == [53, 161]


# -- aliases ----------------------------------------------------------------------

def test_listener_side_index_follows_adds_removals_and_evictions():
    t = table(max_entries=2)
    a = opened(t, 1)
    b = t.open(key(1, original=81), 1337, 1.0)  # port 1 is taken at the listener
    assert b.binding == binding(ALIAS_FIRST) and b.reply_port == 1
    assert t.from_listener_side(binding(1), 1.0) is a
    assert t.from_listener_side(binding(ALIAS_FIRST), 1.0) is b
    opened(t, 7, 2.0)  # the cap evicts the least recently seen: a
    assert t.from_listener_side(binding(1), 2.0) is None
    assert t.free_alias(key(1)) == ALIAS_FIRST + 1  # a's socket, still open, may be there
    t.expire(61.0)  # TIME_WAIT after a's last packet (1.0)
    assert t.free_alias(key(1)) == 1
    t.remove(binding(ALIAS_FIRST))
    assert t.from_listener_side(binding(ALIAS_FIRST), 2.0) is None


def test_a_client_port_whose_listener_closed_first_gets_an_alias_for_time_wait():
    """The listener's socket waits in TIME_WAIT after it closes first, beyond
    the table's memory of the conversation: a SYN from that client port to
    another destination would meet it (and a stale ACK)."""
    t = table()
    opened(t, 41000, original=80)
    t.get(binding(41000), 1.0)
    t.mark_closing(binding(41000), 1.0, listener_fin=True)
    assert t.expire(3.0) == 1 and binding(41000) not in t and t.stats.lingering == 1
    c = t.open(key(41000, original=6000), 1337, 12.0)
    assert c.binding.client_port != 41000 and c.reply_port == 41000
    t.remove(c.binding)
    assert t.expire(60.9) == 0 and t.stats.lingering >= 1
    t.expire(61.0)  # 60 s after the old conversation's last packet
    assert t.open(key(41000, original=6001), 1337, 61.0).binding.client_port == 41000


@pytest.mark.parametrize("closed_by", ["client FIN", "a reset"])
def test_a_client_port_whose_listener_did_not_close_first_is_free_at_once(closed_by):
    t = table()
    opened(t, 41000, original=80)
    t.mark_closing(binding(41000), 1.0)  # the client's FIN, or an RST either way
    t.expire(3.0)
    assert t.stats.lingering == 0
    assert t.open(key(41000, original=6000), 1337, 4.0).binding.client_port == 41000


def test_lingering_bindings_are_bounded_and_udp_has_none():
    t = table(max_entries=10)
    for port in range(100):
        opened(t, 1000 + port, float(port), original=80)
        opened(t, 1000 + port, float(port), protocol=UDP, original=53)
        t.mark_closing(binding(1000 + port), float(port), listener_fin=True)
        t.expire(float(port) + 3.0)
    assert t.stats.lingering == 10  # the most recent ones, all TCP
    assert all(t.free_alias(key(p, original=81)) != p for p in range(1090, 1100))
    assert t.free_alias(key(1089, original=81)) == 1089


def test_a_conversation_idle_for_longer_than_time_wait_does_not_linger():
    t = table()
    opened(t, 41000, 0.0)
    opened(t, 41001, 50.0)
    t.mark_closing(binding(41001), 50.0, listener_fin=True)
    t.expire(52.5)  # 41001 lingers until 110
    t.expire(60.0)  # tcp_idle: 41000 goes, silent for 60 s already
    assert binding(41000) not in t and t.stats.lingering == 1
    assert t.free_alias(key(41000, original=81)) == 41000


def test_alias_is_the_next_free_port_after_the_clients_own():
    t = table()
    opened(t, 40000, original=80)
    opened(t, 40001, original=80)  # another conversation owns 40001 already
    c = t.open(key(40000, original=443), 1337, 0.0)
    assert c.binding.client_port == 40002


def test_one_udp_socket_scanning_ports_costs_constant_work_per_new_conversation():
    """#10: free_alias scanned every alias already given to the client, so a
    one-socket port scan cost O(n) per new conversation (O(n^2) in all)."""
    t = ConversationTable(max_entries=100_000, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)
    n = 20_000
    for original in range(1, n + 1):
        t.open(key(5353, UDP, original), 1337, 0.0)
    assert len(t) == n and t.stats.routes == n
    # Each new conversation: the client's own port (taken), then the next alias.
    assert t.alias_probes <= 2 * n
    ports = {t.route(key(5353, UDP, p)).alias_port for p in range(1, n + 1)}
    assert len(ports) == n  # all distinct at the listener


def test_alias_cursor_skips_taken_ports_and_wraps():
    t = table(max_entries=10)
    opened(t, 65535, protocol=UDP, original=1)
    assert t.open(key(65535, UDP, 2), 1337, 0.0).binding.client_port == ALIAS_FIRST  # wraps
    opened(t, ALIAS_FIRST + 1, protocol=UDP, original=9)  # the client's own port, next in line
    assert t.open(key(65535, UDP, 3), 1337, 0.0).binding.client_port == ALIAS_FIRST + 2


def test_a_client_with_every_alias_taken_costs_one_probe_until_one_is_freed():
    # One UDP socket scanning more ports within udp_idle than there are alias
    # ports: each further datagram used to scan all 64,512 in vain, and the
    # worker handled 10 packets a second.
    n = ALIAS_LAST - ALIAS_FIRST + 1
    t = table(max_entries=n + 10)
    for original in range(1, n + 1):
        t.open(key(5353, UDP, original), 1337, 0.0)
    probes = t.alias_probes
    for original in range(n + 1, n + 101):
        with pytest.raises(OverflowError):
            t.open(key(5353, UDP, original), 1337, 0.0)
    assert t.alias_probes - probes <= 100 * 2 + n  # the first finds out, the rest know
    # A freed alias is found again.
    freed = t.route(key(5353, UDP, 7)).alias_port
    t.remove_route(key(5353, UDP, 7))
    assert t.open(key(5353, UDP, n + 200), 1337, 0.0).binding.client_port == freed
