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


# ---- the client port the kernel gave a conversation (its start's listener_client_port) ----

ASKED = "198.51.100.41:80"


def _remapped(at: str = "08:00:00.100", i: int = 7, seen: int = 51234) -> dict:
    """The start of a conversation of CLIENT to ASKED whose listener sees port `seen`."""
    return {**_start(at=at, i=i), "client_address": "192.0.2.2", "listener_client_port": seen,
            "original_destination": ASKED}


def _http(seen: int = 51234, asked: str = ASKED, at: str = "08:00:00.300") -> dict:
    return {"time": f"2027-01-15T{at}Z", "event": "http", "client": f"192.0.2.2:{seen}",
            "client_address": "192.0.2.2", "listener": "tcp-echo", "original_destination": asked}


def _named(rec: dict, seen: int = 51234) -> dict:
    return {"time": rec["time"], "event": rec["event"], "client": CLIENT, "client_address": "192.0.2.2",
            "listener_client_port": seen, "listener": "tcp-echo", "original_destination": rec["original_destination"]}


def test_a_record_of_the_port_the_kernel_gave_names_the_client_its_start_names():
    order = StartsFirst()
    start = _remapped()
    assert order.add(start, 0.0) == [start]
    http = _http()
    (out,) = order.add(http, 0.1)
    assert out == _named(http) and list(out) == list(_named(http))  # what it saw, after the client's fields
    end = {**start, "event": "end", "time": "2027-01-15T08:00:05.000Z"}
    assert order.add(end, 0.2) == [end]
    late = _http(at="08:00:06.000")
    assert order.add(late, 0.3) == [] and late["client"] == "192.0.2.2:51234"  # ended: no longer its


def test_a_record_that_came_before_its_start_is_named_when_the_start_comes():
    order = StartsFirst()
    http = _http()
    assert order.add(http, 0.0) == []
    start = _remapped()
    assert order.add(start, 0.1) == [start, _named(http)]
    assert order.waiting == 0


def test_another_live_conversation_of_that_port_does_not_let_the_record_go_early():
    """At a high rate the port the kernel gave one conversation is often another's own:
    the record waits for the start of its destination, and then names its client."""
    order = StartsFirst()
    own = {**_start("192.0.2.2:51234", i=1), "original_destination": "198.51.100.99:443"}
    assert order.add(own, 0.0) == [own]
    http = _http()
    assert order.add(http, 0.1) == []
    start = _remapped(i=2)
    assert order.add(start, 0.2) == [start, _named(http)]


def test_only_the_destination_of_the_remapped_conversation_is_renamed():
    order = StartsFirst()
    order.add(_remapped(), 0.0)
    other = _http(asked="198.51.100.42:80")  # the same port seen, another conversation
    assert order.add(other, 0.1) == []  # it waits for its own start
    assert other["client"] == "192.0.2.2:51234" and "listener_client_port" not in other


def test_a_record_whose_listener_knew_the_clients_port_is_left_as_it_is():
    order = StartsFirst()
    order.add(_remapped(), 0.0)
    told = {**_named(_http()), "listener_client_port": 40404}  # the worker's alias, from its table
    assert order.add(dict(told), 0.1) == [told]


def test_a_dns_question_of_the_port_the_kernel_gave_is_named_as_its_dns_conversation():
    """A question names no destination: the remapped conversation must be the DNS listener's."""
    order = StartsFirst(dns_listeners=frozenset({"dns"}))
    question = {"time": "2027-01-15T08:00:00.300Z", "event": "dns", "client": "192.0.2.2:51234",
                "client_address": "192.0.2.2", "name": "a.example"}
    assert order.add(question, 0.0) == []
    start = {**_remapped(), "listener": "dns", "original_destination": "198.51.100.41:53"}
    assert order.add(start, 0.1) == [start, question]
    assert question["client"] == CLIENT and question["listener_client_port"] == 51234
    echo = StartsFirst()  # the conversation another listener's: the question is not its
    echo.add(_remapped(), 0.0)
    other = {**question, "client": "192.0.2.2:51234"}
    del other["listener_client_port"]
    assert echo.add(other, 0.1) == [] and other["client"] == "192.0.2.2:51234"  # it waits, unnamed


def test_a_record_of_the_port_the_kernel_gave_takes_the_start_s_community_id():
    """The listener hashed the flow with the port it saw; the flow is the one the client made."""
    order = StartsFirst()
    start = {**_remapped(), "community_id": "1:as-the-client-sent-it"}
    http = {**_http(), "community_id": "1:as-the-listener-saw-it"}
    assert order.add(http, 0.0) == []  # before its start
    (_, out) = order.add(start, 0.1)
    assert out["client"] == CLIENT and out["community_id"] == "1:as-the-client-sent-it"
    late = {**_http(at="08:00:00.400"), "community_id": "1:as-the-listener-saw-it"}
    (out,) = order.add(late, 0.2)  # after it
    assert out["community_id"] == "1:as-the-client-sent-it"
