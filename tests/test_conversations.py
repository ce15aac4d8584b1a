"""ConversationTable: idle expiry, FIN/RST grace, size cap, stats."""
from __future__ import annotations

import pytest

from nftdivert.conversations import Conversation, ConversationKey, ConversationTable, TableStats
from nftdivert.packet import TCP, UDP

CLIENT = bytes([198, 51, 100, 7])
LOCAL = bytes([203, 0, 113, 1])


def key(port, protocol=TCP):
    return ConversationKey(protocol, CLIENT, port, LOCAL, 80)


def conv(now, original=80):
    return Conversation(original_port=original, listener_port=1337, created=now, last_seen=now)


def table(max_entries=100):
    return ConversationTable(max_entries=max_entries, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)


def test_plain_tuple_finds_the_named_key():
    t = table()
    c = conv(0.0)
    t.add(key(1), c, 0.0)
    assert t.get((TCP, CLIENT, 1, LOCAL, 80), 0.0) is c
    assert t.get((UDP, CLIENT, 1, LOCAL, 80), 0.0) is None
    assert t.get((TCP, CLIENT, 1, LOCAL, 81), 0.0) is None


def test_get_touches_last_seen():
    t = table()
    c = conv(0.0)
    t.add(key(1), c, 0.0)
    assert t.get(key(1), 5.0) is c
    assert c.last_seen == 5.0 and c.created == 0.0


def test_idle_expiry_per_protocol():
    t = table()
    t.add(key(1, TCP), conv(0.0), 0.0)
    t.add(key(1, UDP), conv(0.0), 0.0)
    assert t.expire(9.9) == 0
    assert t.expire(10.0) == 1  # UDP idle reached
    assert key(1, UDP) not in t and key(1, TCP) in t
    assert t.expire(59.9) == 0
    assert t.expire(60.0) == 1
    assert len(t) == 0
    assert t.stats == TableStats(size=0, evicted_idle=2, evicted_closed=0, evicted_cap=0)


def test_traffic_keeps_a_conversation_alive():
    t = table()
    t.add(key(1, UDP), conv(0.0), 0.0)
    t.add(key(2, UDP), conv(0.0), 0.0)
    t.get(key(1, UDP), 8.0)
    assert t.expire(12.0) == 1
    assert key(1, UDP) in t and key(2, UDP) not in t
    assert t.expire(18.0) == 1


def test_idle_scan_does_not_stop_at_a_long_lived_tcp_entry():
    t = table()
    t.add(key(1, TCP), conv(0.0), 0.0)  # older, but TCP idles longer
    t.add(key(2, UDP), conv(1.0), 1.0)
    assert t.expire(11.0) == 1
    assert key(1, TCP) in t and key(2, UDP) not in t


def test_fin_rst_grace():
    t = table()
    t.add(key(1), conv(0.0), 0.0)
    t.add(key(2), conv(0.0), 0.0)
    t.mark_closing(key(1), 5.0)
    t.mark_closing(key(1), 6.0)  # a later FIN does not extend the grace
    assert t.get(key(1), 6.5).closing_since == 5.0  # still usable during grace
    assert t.expire(6.9) == 0
    assert t.expire(7.0) == 1
    assert key(1) not in t and key(2) in t
    assert t.stats.evicted_closed == 1 and t.stats.evicted_idle == 0


def test_mark_closing_unknown_key_is_harmless():
    t = table()
    t.mark_closing(key(9), 1.0)
    assert t.expire(100.0) == 0


def test_cap_evicts_the_oldest():
    t = table(max_entries=3)
    for port in (1, 2, 3):
        t.add(key(port), conv(port), float(port))
    t.add(key(4), conv(4.0), 4.0)
    assert [p for p in (1, 2, 3, 4) if key(p) in t] == [2, 3, 4]
    assert t.stats == TableStats(size=3, evicted_idle=0, evicted_closed=0, evicted_cap=1)


def test_cap_evicts_the_least_recently_used():
    t = table(max_entries=3)
    for port in (1, 2, 3):
        t.add(key(port), conv(port), float(port))
    t.get(key(1), 4.0)
    t.add(key(4), conv(5.0), 5.0)
    assert [p for p in (1, 2, 3, 4) if key(p) in t] == [1, 3, 4]


def test_cap_eviction_forgets_closing_state():
    t = table(max_entries=1)
    t.add(key(1), conv(0.0), 0.0)
    t.mark_closing(key(1), 0.0)
    t.add(key(2), conv(1.0), 1.0)
    assert t.expire(50.0) == 0  # nothing left to close, key 2 not idle yet
    assert key(2) in t


def test_add_replaces_and_resets_closing():
    t = table()
    t.add(key(1), conv(0.0, original=80), 0.0)
    t.mark_closing(key(1), 1.0)
    fresh = conv(2.0, original=81)
    t.add(key(1), fresh, 2.0)
    assert len(t) == 1 and t.get(key(1), 2.0) is fresh
    assert t.expire(10.0) == 0  # the old FIN no longer applies


def test_remove():
    t = table()
    c = conv(0.0)
    t.add(key(1), c, 0.0)
    t.mark_closing(key(1), 0.0)
    assert t.remove(key(1)) is c
    assert t.remove(key(1)) is None
    assert t.expire(100.0) == 0


def test_bad_cap():
    with pytest.raises(ValueError):
        ConversationTable(max_entries=0, tcp_idle=1, udp_idle=1, close_grace=1)


def test_listener_side_index_follows_adds_removals_and_evictions():
    t = table(max_entries=2)
    a, b = conv(0.0), conv(0.0, original=81)
    t.add(key(1), a, 0.0)
    assert t.free_alias(ConversationKey(TCP, CLIENT, 1, LOCAL, 81)) == 2  # port 1 is taken there
    b.alias_port = 2
    t.add(ConversationKey(TCP, CLIENT, 1, LOCAL, 81), b, 1.0)
    assert t.from_listener_side((TCP, CLIENT, 1, LOCAL), 1.0) == (key(1), a)
    assert t.from_listener_side((TCP, CLIENT, 2, LOCAL), 1.0)[1] is b
    t.add(key(7), conv(2.0), 2.0)  # the cap evicts the least recently seen: a
    assert t.from_listener_side((TCP, CLIENT, 1, LOCAL), 2.0) is None
    assert t.free_alias(key(1)) == 1
    t.remove(ConversationKey(TCP, CLIENT, 1, LOCAL, 81))
    assert t.from_listener_side((TCP, CLIENT, 2, LOCAL), 2.0) is None
