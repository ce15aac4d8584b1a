"""End to end: a client port used again gets a conversation of its own.

An HTTP server closes first, so the listener's socket waits in TIME_WAIT
(60 s) long after the worker has forgotten the conversation (close_grace).
When the client then uses the same port towards another destination, the
queue path must not send the new SYN to that socket: it would answer with a
stale ACK of the old conversation, the client would reset and retry, and
the log would show a conversation twice. The kernel path gets a fresh tuple
from conntrack (the old entry's reply tuple is still taken). Backend:
NFTDIVERT_TEST_BACKEND, as in test_e2e.py.

A stale answer shows in the log as two starts (the client resets and
retries). How a conversation ended is not asserted: it is the wire's, and
on a loaded machine a listener that sees no ACK within a few milliseconds
sends its FIN again (a tail loss probe); the client's second ACK then finds
the socket gone and draws a reset, truthfully logged as `"ended": "reset"`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict

import pytest

import harness

pytestmark = pytest.mark.kernel

GRACE = 0.3  # worker.close_grace: the worker forgets a closed conversation quickly


def _time_wait_peers(ns) -> set[int]:
    """Client ports of the listener's sockets in TIME_WAIT."""
    out = ns.run("ss", "-Htan", "state", "time-wait", f"sport = :{harness.LISTENER_PORT}", check=False).stdout
    return {int(m[1]) for line in out.splitlines() if (m := re.search(r":(\d+)\s*$", line))}


def _evicted_closed(ns) -> int:
    m = re.search(r"closed (\d+), cap", harness.nftdivert(ns, "status").stdout)
    return int(m[1]) if m else -1


@pytest.mark.any_backend  # the worker's table, the same on both backends
def test_a_client_port_used_again_after_the_listener_closed_first_is_answered_at_once(gw):
    if not harness.KERNEL_PATH and not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker's counters say when it forgot a conversation")
    gw.stop()
    div = gw.ensure(close_grace=GRACE)
    tag = uuid.uuid4().hex[:6]
    sports = [gw.fresh_port() for _ in range(10)]
    request = f"GET /{tag} HTTP/1.1\r\nHost: reuse.example\r\n\r\n"
    first = [[p, "198.51.100.10", 80, request] for p in sports]
    r = gw.client_run("from-ports", "--json", json.dumps(first), timeout=60)
    assert all(x["ok"] and x["reply"].startswith("HTTP/1.1 200") for x in r["results"]), r["results"]

    # The listener closed first: its sockets wait in TIME_WAIT on these client ports.
    harness.wait_for(lambda: set(sports) <= _time_wait_peers(gw.diverter_ns), 10, "the listener's sockets in TIME_WAIT",
                 detail=lambda: f"TIME_WAIT towards {sorted(_time_wait_peers(gw.diverter_ns))}")
    if not harness.KERNEL_PATH:  # and the worker has forgotten those conversations
        harness.wait_for(lambda: _evicted_closed(gw.diverter_ns) >= len(sports), 15,
                     "the worker to forget the HTTP conversations",
                     detail=lambda: harness.nftdivert(gw.diverter_ns, "status").stdout)

    second = [[p, "198.18.23.20", 6000 + k, f"echo-{k}-{tag}"] for k, p in enumerate(sports)]
    r = gw.client_run("from-ports", "--half-close", "--json", json.dumps(second), timeout=60)
    bad = [x for x, (_, _, _, payload) in zip(r["results"], second)
           if not x["ok"] or x["reply"] != payload or x["syn_retransmits"] != 0]
    assert not bad, f"{len(bad)} of 10 not answered at the first SYN (a stale ACK, then a retry): {bad}"
    # Untouched by the new conversations (a SYN that met one would have replaced or reset it).
    assert set(sports) <= _time_wait_peers(gw.diverter_ns), "the new conversations met the old sockets"

    gw.stop()  # every conversation still tracked gets its end now
    records = defaultdict(list)
    for x in div.log():
        if x.get("event") in ("start", "end") and x["client"] in {f"{harness.CLIENT4}:{p}" for p in sports}:
            records[x["original_destination"]].append(x)
    want = {"198.51.100.10:80": 10, **{f"198.18.23.20:{6000 + k}": 1 for k in range(10)}}
    assert {d: len(v) // 2 for d, v in records.items()} == want, dict(records)
    ids = set()
    for dest, recs in records.items():
        by_client = defaultdict(list)
        for x in recs:
            by_client[x["client"]].append(x)
        for client, mine in by_client.items():
            assert sorted(x["event"] for x in mine) == ["end", "start"], (dest, client, mine)
            assert mine[0]["id"] == mine[1]["id"], mine
            ids.add(mine[0]["id"])
    assert len(ids) == 20, f"{len(ids)} distinct ids for 20 conversations"


def _kernel_remaps(ns) -> int:
    m = re.search(r"kernel remaps (\d+)", harness.nftdivert(ns, "status").stdout)
    return int(m[1]) if m else -1


@pytest.mark.any_backend  # the worker's table and its conntrack questions, the same on both backends
def test_a_conversation_the_kernel_remaps_onto_a_closed_conversations_client_port_is_answered(gw):
    """Towards an address on the port an earlier conversation of the same
    client port asked for, the kernel remaps the client port (the earlier
    entry, in TIME_WAIT, holds the reply tuple), to a port of its choice.
    Below 512, or from 600 to 1023, it chooses in that range: here every
    port but one there has just closed a conversation towards another port,
    so the queue path's listener answers on a binding the worker still holds
    as closing. Conntrack's entry of that closed conversation must not be
    taken for the new one (it had its reply: the new one has not): the SYN/ACK
    went to it, every retry too, and the client timed out."""
    if not harness.KERNEL_PATH and not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker's counters show the kernel's remap")
    gw.stop()
    div = gw.ensure(close_grace=60.0)  # the closed conversations stay in the worker's table meanwhile
    tag = uuid.uuid4().hex[:6]
    # The remap needs a free port in the range. The kernel looks for one in runs of consecutive
    # ports from random places (128, 64, 32, 16): a run can miss every free port (the SYN is then
    # dropped and its retry tried again). The queue path keeps one free port, so the remap lands
    # on a closed conversation's (the worker's case); the kernel path, with no worker, keeps
    # every fourth, which any run meets.
    sport = 700
    free = {p for p in range(600, 1024) if p % 4 == 3} if harness.KERNEL_PATH else {1023}
    first = [[sport, "198.51.100.31", 7777, f"old-{tag}"]]
    first += [[p, "198.51.100.32", 7778, f"fill-{p}-{tag}"] for p in range(600, 1024) if p != sport and p not in free]
    r = gw.client_run("from-ports", "--half-close", "--json", json.dumps(first), timeout=300)
    assert all(x["ok"] for x in r["results"]), [x for x in r["results"] if not x["ok"]][:5]

    second = [[sport, "198.51.100.33", 7777, f"new-{tag}"]]
    r = gw.client_run("from-ports", "--half-close", "--json", json.dumps(second), timeout=60)
    (x,) = r["results"]
    assert x["ok"] and x["reply"] == f"new-{tag}" and x["syn_retransmits"] == 0, x
    if not harness.KERNEL_PATH:
        harness.wait_for(lambda: _kernel_remaps(gw.diverter_ns) >= 1, 5,  # the counters are published once a second
                     "the kernel's remap counted (else the test proved nothing)")
    lines = gw.log_barrier(div)
    mine = [y["original_destination"] for y in lines if y["client"] == f"{harness.CLIENT4}:{sport}"]
    assert sorted(mine) == ["198.51.100.31:7777", "198.51.100.33:7777"], mine


@pytest.mark.any_backend
def test_a_client_port_the_kernel_remapped_an_earlier_conversation_to_is_answered_at_once(gw):
    """The kernel remaps a client port when the listener-side tuple is taken
    (the same client port, towards another destination, still in conntrack's
    TIME_WAIT). That conversation leaves a listener socket in TIME_WAIT on the
    remapped port P'. When the client later uses P' itself, the kernel (6.x)
    evicts the earlier conntrack entry instead of remapping again, once the
    new SYN's sequence number is past the old one: it takes the listener's
    socket to accept the SYN as a new incarnation. With TCP timestamps on, the
    socket also asks for a timestamp newer than the old conversation's, and a
    Linux client's timestamp clock differs per destination: about one time in
    three the socket answered with the stale ACK of the old conversation, the
    client reset and retried, and the log showed the conversation twice."""
    gw.stop()
    div = gw.ensure()
    tag = uuid.uuid4().hex[:6]
    sports = [gw.fresh_port() for _ in range(24)]
    before = _time_wait_peers(gw.diverter_ns)
    request = f"GET /{tag} HTTP/1.1\r\nHost: remap.example\r\n\r\n"
    for dest in ("198.51.100.11", "198.51.100.12"):  # the second meets the first's entries: remapped
        r = gw.client_run("from-ports", "--json", json.dumps([[p, dest, 80, request] for p in sports]), timeout=60)
        assert all(x["ok"] and x["reply"].startswith("HTTP/1.1 200") for x in r["results"]), r["results"]

    def remapped() -> set[int]:
        return _time_wait_peers(gw.diverter_ns) - before - set(sports)
    harness.wait_for(lambda: len(remapped()) >= len(sports), 10, "the remapped conversations' sockets in TIME_WAIT",
                     detail=lambda: f"TIME_WAIT towards {sorted(_time_wait_peers(gw.diverter_ns))}")
    third = [[p, f"198.18.24.{k + 1}", 6000 + k, f"echo-{k}-{tag}"] for k, p in enumerate(sorted(remapped()))]
    r = gw.client_run("from-ports", "--half-close", "--json", json.dumps(third), timeout=60)
    # The kernel chose those ports anywhere from 1024 up: one may be in the client's own use
    # (its ephemeral range). The client cannot make that conversation; the others count.
    made = [(x, step) for x, step in zip(r["results"], third) if "Address already in use" not in x.get("error", "")]
    assert len(made) >= 16, r["results"]
    bad = [x for x, (_, _, _, payload) in made if not x["ok"] or x["reply"] != payload or x["syn_retransmits"] != 0]
    assert not bad, f"{len(bad)} of {len(made)} not answered at the first SYN (a stale ACK, then a retry): {bad}"

    lines = gw.log_barrier(div)
    gw.stop()
    records = defaultdict(list)
    for x in div.log():
        if x.get("event") in ("start", "end") and x["original_destination"].startswith("198.18.24."):
            records[x["client"]].append(x["event"])
    assert {c: sorted(v) for c, v in records.items()} == {f"{harness.CLIENT4}:{p}": ["end", "start"]
                                                          for _, (p, *_) in made}
    assert lines


def _status(ns) -> str:
    return harness.nftdivert(ns, "status").stdout


def _stale_sockets_closed(ns) -> int:
    m = re.search(r"stale answers \d+: sockets closed (\d+)", _status(ns))
    return int(m[1]) if m else -1


@pytest.mark.any_backend  # the worker's table and its conntrack questions, the same on both backends
@pytest.mark.queue_path  # on the kernel path the listener's tuple is conntrack's own (the test above)
@pytest.mark.parametrize("grace", [GRACE, 60.0], ids=["forgotten", "closing"])
def test_a_remap_onto_a_listener_socket_in_time_wait_is_one_conversation(gw, grace):
    """One client port towards two addresses on one port: the kernel remaps
    the second conversation's client port at input NAT, after the worker saw
    it, to a port of its choice (from 600 to 1023 for a port in that range).
    Here the listener's sockets of earlier HTTP conversations wait in
    TIME_WAIT on nearly every port there: the worker has forgotten those
    conversations, or holds them as closing. Such a socket answered the new
    SYN with a bare ACK of its old conversation about one time in two (it
    wants a newer timestamp, and a Linux client's timestamp clock differs
    per destination): the client reset and retried, and the log held the
    conversation twice. The queue path drops that answer and closes the
    socket, and the client's retransmitted SYN is answered."""
    if not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker's counters show what it cleared")
    gw.stop()
    div = gw.ensure(close_grace=grace)
    tag = uuid.uuid4().hex[:6]
    trials = list(range(600, 616))  # not filled: the first conversation of a trial keeps its port
    fill = list(range(616, 1024))
    request = f"GET /{tag} HTTP/1.1\r\nHost: fill.example\r\n\r\n"
    r = gw.client_run("from-ports", "--json", json.dumps([[p, "198.51.100.40", 80, request] for p in fill]),
                      timeout=300)
    assert all(x["ok"] and x["reply"].startswith("HTTP/1.1 200") for x in r["results"]), \
        [x for x in r["results"] if not x["ok"]][:5]
    harness.wait_for(lambda: set(fill) <= _time_wait_peers(gw.diverter_ns), 10, "the listener's sockets in TIME_WAIT",
                     detail=lambda: f"missing {sorted(set(fill) - _time_wait_peers(gw.diverter_ns))[:20]}")
    if not harness.KERNEL_PATH and grace == GRACE:
        harness.wait_for(lambda: _evicted_closed(gw.diverter_ns) >= len(fill), 15,
                         "the worker to forget the HTTP conversations", detail=lambda: _status(gw.diverter_ns))

    # Each trial from its own port, to its own pair of addresses: the timestamp
    # clock towards each differs, so each trial is a fresh toss.
    results = []
    for k, sport in enumerate(trials):
        pair = [["198.51.100.41", 6200 + k, f"first-{k}-{tag}"], [f"198.51.100.{100 + k}", 6200 + k, f"second-{k}-{tag}"]]
        r = gw.client_run("fan-out", "tcp", "--sport", str(sport), "--json", json.dumps(pair), timeout=60)
        results += r["results"]
    assert all(x["ok"] for x in results), [x for x in results if not x["ok"]]
    # Else the test proved nothing: about half the remaps meet a socket that answers stale.
    harness.wait_for(lambda: _stale_sockets_closed(gw.diverter_ns) >= 1, 5,
                     "a stale answer met and its socket closed", detail=lambda: _status(gw.diverter_ns))

    lines = gw.log_barrier(div)
    gw.stop()
    records = defaultdict(list)
    for x in div.log():
        if x.get("event") in ("start", "end") and x["original_destination"].split(":")[1].startswith("62"):
            records[x["original_destination"]].append(x)
    want = {f"198.51.100.41:{6200 + k}" for k in range(len(trials))} | \
        {f"198.51.100.{100 + k}:{6200 + k}" for k in range(len(trials))}
    assert set(records) == want, sorted(records)
    for dest, mine in records.items():
        assert sorted(x["event"] for x in mine) == ["end", "start"], (dest, mine)
        assert mine[0]["id"] == mine[1]["id"], mine
    assert lines
