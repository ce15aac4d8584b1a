"""The observer's end records where conntrack does not give them plainly.

Without a kernel: an entry of a protocol without ports (IP protocol 253,
which conntrack tracks generically) parses, with null ports; a dump skips an
entry it cannot read, and counts it, instead of losing every other one.
Against the kernel, in a namespace of its own: a portless conversation and a
TCP one both end at close; an entry an earlier run left gets no end record
here; the socket's lost events are counted one by one.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import sys

import communityid
import pytest

from conftest import REPO
from nftdivert.netlink import ctnetlink
from nftdivert.netlink.codec import NLMSGHDR, NetlinkFormatError, answers, messages
from nftdivert.observers import convrecords
from test_convrecords import CLIENT, OURS, _ports, _tuple, message, parse

GENERIC = 253  # "use for experimentation and testing" (RFC 3692): conntrack's generic tracker
ASKED = "198.51.100.9"


def _bare(protocol: int) -> bytes:
    return struct.pack("=HHB3x", 5, 1, protocol)  # CTA_PROTO_NUM alone: no ports


def generic_event(msg_type: int = 0x100, ct_id: int = 78) -> bytes:
    return message(_tuple(1, CLIENT, ASKED, _bare(GENERIC)), _tuple(2, OURS, CLIENT, _bare(GENERIC)),
                   ct_id=ct_id, msg_type=msg_type)


def test_a_portless_protocol_parses_with_null_ports_and_is_logged_by_address():
    ev = parse(generic_event())
    assert (ev.protocol, ev.src_port, ev.dst_port, ev.reply_src_port, ev.icmp) == (GENERIC, None, None, None, None)
    listener = convrecords.listener_for(ev, {}, {6: ("tcp-echo", 1337), 17: ("udp-echo", 1337)},
                                        lambda *_: False, None)
    assert listener == ("", None)  # nothing listens: the kernel takes the packet and answers nothing
    rec = convrecords.start_record(ev, 1_800_000_000.0, listener, "eth1")
    assert (rec["protocol"], rec["client"], rec["original_destination"]) == ("253", CLIENT, ASKED), rec
    assert "listener_port" not in rec and rec["listener"] == "", rec


def test_an_entry_without_our_mark_is_not_read_beyond_its_mark():
    (_t, _f, _s, ours), = messages(generic_event())
    (_t, _f, _s, theirs), = messages(message(b"", b"", mark=0x1))  # no tuples: it would not parse
    assert ctnetlink.parse_event("new", ours, 0x200000).id == 78
    assert ctnetlink.parse_event("new", theirs, 0x200000) is None


def test_tcp_without_its_ports_is_still_malformed():
    with pytest.raises(NetlinkFormatError):
        parse(message(_tuple(1, CLIENT, ASKED, _bare(6)), _tuple(2, OURS, CLIENT, _bare(6))))


def _dump_answer(*entries: bytes) -> bytes:
    done = NLMSGHDR.pack(NLMSGHDR.size + 4, 3, 2, 0, 0) + struct.pack("=i", 0)  # NLMSG_DONE, as `message` seq 0
    return b"".join(entries) + done


def test_the_dump_skips_and_counts_an_entry_it_cannot_read():
    good = message(_tuple(1, CLIENT, ASKED, _ports(6, 40000, 80)), _tuple(2, OURS, CLIENT, _ports(6, 80, 40000)))
    bad = message(_tuple(1, CLIENT, ASKED, _bare(6)), _tuple(2, OURS, CLIENT, _bare(6)), ct_id=79)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.send(_dump_answer(bad, generic_event(), good))
        dump = ctnetlink.Dump([])
        ctnetlink.read_dump(answers(b, 0), dump)
    assert [(ev.id, ev.kind) for ev in dump.live] == [(78, "live"), (77, "live")] and dump.unreadable == 1


def test_a_synthesized_end_keeps_what_the_start_said_and_claims_nothing_else():
    ev = parse(generic_event())
    start = convrecords.start_record(ev, 1_800_000_000.0, ("", None), "eth1", process={"pid": 1})
    end = convrecords.synthesized_end(start, 1_800_000_010.0)
    assert end == {"v": 1, "time": "2027-01-15T08:00:10.000Z", "event": "end", "id": 78, "protocol": "253",
                   "client": CLIENT, "client_address": "192.0.2.2", "original_destination": ASKED,
                   "community_id": communityid.CommunityID().calc(communityid.FlowTuple(253, CLIENT, ASKED)),
                   "listener": "", "interface": "eth1", "duration": None, "sent": None, "received": None, "ended": "unknown"}


# ---- against the kernel ---------------------------------------------------------------

RULESET = """\
table inet ours {
	chain out {
		type nat hook output priority -100; policy accept;
		ip daddr 198.51.100.0/24 ct mark set ct mark | 0x200000 redirect
	}
}
"""

PRELUDE = r"""
import json, socket, subprocess, threading, time
from nftdivert.observers import ctsettings
from nftdivert.observers.observer import Observer

def wait(cond, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)

records = []
tcp = socket.create_server(("0.0.0.0", 4444))
accepted = []
threading.Thread(target=lambda: [accepted.append(tcp.accept()[0]) for _ in range(3)], daemon=True).start()
"""


def _observe(host, script: str) -> dict:
    host.run("ip", "link", "set", "lo", "up")
    host.run("ip", "link", "add", "out0", "type", "veth", "peer", "name", "void0")
    host.run("ip", "addr", "add", "192.0.2.10/24", "dev", "out0")
    for dev in ("out0", "void0"):
        host.run("ip", "link", "set", dev, "up")
    host.run("ip", "route", "add", "default", "dev", "out0")
    host.run("nft", "-f", "-", input=RULESET)
    proc = host.run(sys.executable, "-c", PRELUDE + script, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    return json.loads(proc.stdout)


def _pairs(records: list[dict]) -> dict[int, list[str]]:
    events: dict[int, list[str]] = {}
    for rec in records:
        events.setdefault(rec["id"], []).append(rec["event"])
    return events


PORTLESS = r"""
obs = Observer(0x200000, lambda rec, when: records.append(rec), lambda ev, when: ("", None))
with ctsettings.accounting():
    held = socket.create_connection(("198.51.100.1", 4444))  # still open at close
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253)
    raw.sendto(b"a sample's experiment", ("198.51.100.2", 0))
    wait(lambda: len(records) >= 2, "two start records")
    obs.close()
print(json.dumps({"records": records, "counts": obs.counts()}))
"""


@pytest.mark.kernel
def test_a_portless_conversation_ends_and_every_other_one_too(host):
    out = _observe(host, PORTLESS)
    recs = out["records"]
    assert sorted(_pairs(recs).values()) == [["start", "end"], ["start", "end"]], recs
    generic = [r for r in recs if r["protocol"] == "253"]
    assert [r["original_destination"] for r in generic] == ["198.51.100.2", "198.51.100.2"], recs
    assert generic[1]["ended"] == "open" and generic[1]["sent"]["packets"] == 1, generic
    tcp = [r for r in recs if r["protocol"] == "tcp"]
    assert tcp[1]["ended"] == "open" and tcp[1]["original_destination"] == "198.51.100.1:4444", tcp
    assert out["counts"]["failed"] == out["counts"]["unreadable"] == 0, out


EARLIER = r"""
with ctsettings.accounting():
    # The earlier run: its observer listened while its conversation began. (With no
    # listener at all, conntrack gives an entry no events, not even its DESTROY.)
    before = []
    earlier = Observer(0x200000, lambda rec, when: before.append(rec), lambda ev, when: ("", None))
    old = socket.create_connection(("198.51.100.3", 4444))  # an earlier run's, closed: TIME_WAIT
    old.close()
    wait(lambda: before, "the earlier run's start")
    earlier.close()  # that run ends; its conversation's entry lives on
    obs = Observer(0x200000, lambda rec, when: records.append(rec), lambda ev, when: ("", None))
    new = socket.create_connection(("198.51.100.4", 4444))
    wait(lambda: records, "the start of this run's conversation")
    subprocess.run(["conntrack", "-D", "-p", "tcp", "--orig-dst", "198.51.100.3"], check=True, capture_output=True)
    wait(lambda: obs.ends.earlier or len(records) > 1, "the earlier run's end")
    new.close()
    obs.close()
print(json.dumps({"records": records, "counts": obs.counts()}))
"""


@pytest.mark.kernel
def test_the_end_of_an_earlier_runs_conversation_is_counted_not_logged(host):
    out = _observe(host, EARLIER)
    assert [(r["event"], r["original_destination"]) for r in out["records"]] == [
        ("start", "198.51.100.4:4444"), ("end", "198.51.100.4:4444")], out
    assert out["counts"]["earlier"] == 1 and out["counts"]["recovered"] == 0, out


OVERRUN = r"""
import os
from nftdivert.netlink.ctnetlink import EventSocket
events = EventSocket(buffer=0)  # the kernel's smallest: a few events
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20000 + SENT):
    sender.sendto(b"x", ("127.0.0.1", port))  # one new conntrack entry each
read = 0
while batch := events.read():
    read += len(batch)
print(json.dumps({"read": read, "lost": events.lost, "overflows": events.overflows}))
"""


@pytest.mark.kernel
def test_lost_events_are_counted_one_by_one(host):
    host.run("ip", "link", "set", "lo", "up")
    host.run("nft", "-f", "-", input=RULESET)  # a ruleset that uses conntrack: it tracks from now on
    script = f"import json, socket\nSENT = 300\n{OVERRUN}"
    proc = host.run(sys.executable, "-c", script, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    out = json.loads(proc.stdout)
    assert out["lost"] > 0 and out["read"] + out["lost"] == 300, out
    assert out["overflows"] >= 1, out


SHARED_ID = r"""
import json, sys
from nftdivert.netlink import codec, ctnetlink
from nftdivert.observers.observer import Observer
from test_convrecords import CLIENT, OURS, _ports, _tuple, message

def event(sport, msg_type):
    data = message(_tuple(1, CLIENT, "198.51.100.5", _ports(6, sport, 80)), _tuple(2, OURS, CLIENT, _ports(6, 80, sport)),
                   ct_id=4242, msg_type=msg_type)
    (t, _f, _s, payload), = codec.messages(data)
    return ctnetlink.event_kind(t), payload

records = []
obs = Observer(0x200000, lambda rec, when: records.append(rec), lambda ev, when: ("tcp-echo", 1337))
for sport, msg_type in ((40001, 0x100), (40002, 0x100), (40001, 0x102), (40002, 0x102)):
    obs._handle(*event(sport, msg_type))
obs.close()
print(json.dumps(records))
"""


@pytest.mark.kernel
def test_two_conversations_that_share_a_conntrack_id_each_get_their_end(host):
    """Conntrack's id is a 32-bit hash: a flood of 100,000 entries had a pair sharing one."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "observers")]))
    recs = json.loads(host.run(sys.executable, "-c", SHARED_ID, env=env, timeout=60).stdout)
    assert [(r["event"], r["client"], r["ended"] if r["event"] == "end" else None) for r in recs] == [
        ("start", f"{CLIENT}:40001", None), ("start", f"{CLIENT}:40002", None),
        ("end", f"{CLIENT}:40001", "timeout"), ("end", f"{CLIENT}:40002", "timeout")], recs


LOST_DESTROYS = r"""
import subprocess, socket, threading
from nftdivert.observers import observer

go = threading.Event()
run = observer.Observer._run
observer.Observer._run = lambda self: (go.wait(), run(self))  # it reads nothing until told
obs = observer.Observer(0x200000, lambda rec, when: records.append(rec), lambda ev, when: ("", None))
obs._events.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # the kernel's smallest: a few events
with ctsettings.accounting():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for port in range(5000, 5040):
        u.sendto(b"x", ("198.51.100.6", port))
    subprocess.run(["conntrack", "-D", "--orig-dst", "198.51.100.6"], check=True, capture_output=True)
    go.set()
    obs.close()
print(json.dumps({"records": records, "counts": obs.counts()}))
"""


@pytest.mark.kernel
def test_a_conversation_whose_destroy_was_lost_gets_an_unknown_end(host):
    out = _observe(host, LOST_DESTROYS)
    recs, counts = out["records"], out["counts"]
    starts = [r for r in recs if r["event"] == "start"]
    assert starts and all(ev == ["start", "end"] for ev in _pairs(recs).values()), recs
    assert {r["ended"] for r in recs if r["event"] == "end"} == {"unknown"}, recs
    assert counts["event_lost"] == len(starts) and counts["events_lost"] == 80 - len(starts), counts
