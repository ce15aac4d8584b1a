"""The log's order: a listener's record waits, briefly and boundedly, for its conversation's start (pure)."""

from __future__ import annotations

from nftdivert.observers.logorder import StartsFirst

CLIENT = "192.0.2.2:40000"


def _start(client: str = CLIENT, at: str = "08:00:00.100", i: int = 1) -> dict:
    return {"time": f"2027-01-15T{at}Z", "event": "start", "id": i, "client": client}


def _end(client: str = CLIENT, at: str = "08:00:05.000", i: int = 1) -> dict:
    return {**_start(client, at, i), "event": "end"}


def _tls(client: str = CLIENT, at: str = "08:00:00.300") -> dict:
    return {"time": f"2027-01-15T{at}Z", "event": "tls", "client": client}


def test_a_listener_record_waits_for_its_start_and_then_follows_it():
    order = StartsFirst()
    tls, http = _tls(), {**_tls(at="08:00:00.400"), "event": "http"}
    assert order.add(tls, 0.0) == [] and order.add(http, 0.1) == []
    start = _start()
    assert order.add(start, 0.2) == [start, tls, http]
    assert order.waiting == 0
    later = {**_tls(at="08:00:01.000"), "event": "http"}
    assert order.add(later, 0.3) == [later]  # its start is written: nothing to wait for
    end = _end()
    assert order.add(end, 0.4) == [end]
    again = _tls(at="08:00:06.000")
    assert order.add(again, 0.5) == []  # a new conversation from the same client port: its start comes


def test_a_later_observer_record_releases_what_was_made_before_it():
    order = StartsFirst()
    question = {"time": "2027-01-15T08:00:00.300Z", "event": "dns", "client": "192.0.2.2:5353"}
    assert order.add(question, 0.0) == []  # a question to our own address: no start ever comes
    other = _start("192.0.2.2:40001", at="08:00:00.200")
    assert order.add(other, 0.1) == [other]  # began before the question was answered: it proves nothing
    named = _start("192.0.2.2:40002", at="08:00:00.500", i=2)
    assert order.add(named, 0.2) == [question, named]


def test_the_wait_is_bounded_in_time_and_in_records():
    order = StartsFirst(hold_seconds=2.0, limit=3)
    first = _tls("192.0.2.2:1")
    order.add(first, 10.0)
    assert order.wait(10.5) == 1.5 and order.due(11.9) == []
    assert order.due(12.0) == [first] and order.wait(12.0) is None
    held = [_tls(f"192.0.2.2:{p}") for p in range(2, 6)]
    assert [order.add(r, 13.0) for r in held] == [[], [], [], [held[0]]]  # beyond the limit: the oldest goes
    assert order.flush() == held[1:] and order.waiting == 0


def test_the_listeners_records_keep_their_order():
    order = StartsFirst(hold_seconds=1.0)
    question = {"time": "2027-01-15T08:00:00.300Z", "event": "dns", "client": "192.0.2.2:5353"}
    recycled = {"time": "2027-01-15T08:00:00.310Z", "event": "dns_recycled", "address": "198.18.0.9"}
    tls = _tls(at="08:00:00.400")
    assert order.add(question, 0.0) == [] and order.add(recycled, 0.0) == [] and order.add(tls, 0.1) == []
    start = _start(at="08:00:00.050")  # the TLS conversation's: it began before the question
    assert order.add(start, 0.2) == [start]  # its record waits behind the question
    assert order.due(1.0) == [question, recycled, tls] and order.flush() == []


def test_records_without_client_and_odd_ones_pass():
    order = StartsFirst()
    recycled = {"event": "dns_recycled", "time": "2027-01-15T08:00:00.000Z", "address": "198.18.0.9"}
    assert order.add(recycled, 0.0) == [recycled]
    bare = {"event": "start"}
    assert order.add(bare, 0.0) == [bare]


def test_the_clients_it_remembers_are_bounded():
    order = StartsFirst(live_limit=2)
    for p in range(3):
        order.add(_start(f"192.0.2.2:{p}", i=p), 0.0)
    assert order.add(_tls("192.0.2.2:0"), 0.0) == []  # forgotten: it waits (at most a while)
    order.flush()
    rec = _tls("192.0.2.2:2")
    assert order.add(rec, 0.0) == [rec]


def test_a_question_gets_its_conversation_s_community_id_only_when_one_start_says_which():
    order = StartsFirst()
    question = {"time": "2027-01-15T08:00:00.300Z", "event": "dns", "client": CLIENT}
    assert order.add(question, 0.0) == []
    start = {**_start(), "community_id": "1:first"}
    assert order.add(start, 0.1) == [start, {**question, "community_id": "1:first"}]
    own = {**_tls(at="08:00:00.400"), "community_id": "1:its-own"}
    assert order.add(own, 0.2) == [own]  # one it has is kept
    second = {**_start(at="08:00:00.500", i=2), "community_id": "1:second"}  # the same client port, elsewhere
    order.add(second, 0.3)
    after = {**question, "time": "2027-01-15T08:00:00.600Z"}
    assert order.add(after, 0.4) == [after] and "community_id" not in after  # either of two: none
    order.add(_end(i=2), 0.5)
    late = {**question, "time": "2027-01-15T08:00:05.100Z"}
    assert order.add(late, 0.6) == [late] and "community_id" not in late  # which one is left is unknown
    order.add(_end(), 0.7)
    alone = {**question, "time": "2027-01-15T08:00:06.000Z"}
    assert order.add(alone, 0.8) == []  # no start: it waits, and gets nothing
    assert order.flush() == [alone] and "community_id" not in alone
