"""Every conversation a run starts gets exactly one end record in its log, and no other.

Real clients in the gateway lab, `nftdivert run` stopped with SIGTERM, the
log read back:
- a packet of IP protocol 253 (no ports; conntrack tracks it generically
  for 600 s) is logged by address, and at the stop it ends like every other
  conversation instead of costing all of them their ends;
- a run started right after another does not log the ends of the
  conversations the first one started (their TIME_WAIT entries outlive it);
- UDP and ICMP conversations whose entries expire just before the stop get
  their real end (the dump at stop reaps them), not none.
"""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime

import pytest

import harness

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

SEND_253 = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 253); "
            "s.sendto(b'a sample tries a protocol of its own', (sys.argv[1], 0))")


@pytest.fixture
def lab_ns(gw):
    gw.stop()  # each test runs diverters of its own
    return gw


def _diverter(gw, name: str) -> harness.Diverter:
    return harness.Diverter(gw.diverter_ns, gw.workdir, harness.config_text(after_stop="remove"), name=name).start()


def _ends_by_start(records: list[dict]) -> dict[int, list[str]]:
    """conversation id -> its records' events, in log order; every one must be [start, end]."""
    events: dict[int, list[str]] = {}
    for rec in records:
        if rec.get("event") in ("start", "end"):
            events.setdefault(rec["id"], []).append(rec["event"])
    return events


def _assert_one_end_each(div: harness.Diverter) -> list[dict]:
    records = div.log()
    odd = {cid: ev for cid, ev in _ends_by_start(records).items() if ev != ["start", "end"]}
    assert not odd, f"conversations without exactly one start and one end: {odd}\n{records}"
    err = div.stderr()
    assert re.search(r"ends synthesized 0 \(.*\), unended 0,", err), err
    return records


def _stopped(div: harness.Diverter) -> None:
    try:
        div.stop_and_check()
    finally:
        div.kill()


def test_a_portless_protocol_is_logged_and_every_conversation_still_ends(lab_ns):
    gw = lab_ns
    div = _diverter(gw, "ends-253")
    try:
        assert gw.tcp("198.51.100.80", gw.fresh_port(), "before")["ok"]
        gw.client.run(sys.executable, "-c", SEND_253, "198.51.100.81")
        div.wait_log(lambda r: r.get("protocol") == "253", what="the start record of the protocol-253 packet")
        assert gw.udp("198.51.100.82", gw.fresh_port(), "after")["ok"]
    finally:
        _stopped(div)
    records = _assert_one_end_each(div)
    start, end = [r for r in records if r["protocol"] == "253"]
    assert (start["client"], start["original_destination"]) == (harness.CLIENT4, "198.51.100.81"), start
    assert start["listener"] == "" and "listener_port" not in start, start
    assert end["ended"] == "open" and end["sent"]["packets"] == 1, end


def test_a_run_after_another_logs_no_end_it_did_not_start(lab_ns):
    gw = lab_ns
    first = _diverter(gw, "ends-first")
    try:
        for n in range(3):  # closed: their entries stay in TIME_WAIT for two minutes
            assert gw.tcp("198.51.100.90", gw.fresh_port(), f"first-{n}")["ok"]
    finally:
        _stopped(first)
    second = _diverter(gw, "ends-second")
    try:
        port = gw.fresh_port()
        assert gw.tcp("198.51.100.91", port, "second")["ok"]
        second.wait_log(lambda r: r.get("event") == "start" and r["original_destination"] == f"198.51.100.91:{port}",
                        what="the second run's own start")
        # The first run's entries end now, while the second runs (as their TIME_WAIT would).
        gw.diverter_ns.run("conntrack", "-D", "--orig-dst", "198.51.100.90")
        # Then one of the second run's: its end, on the same socket, comes after theirs.
        gw.diverter_ns.run("conntrack", "-D", "--orig-dst", "198.51.100.91")
        second.wait_log(lambda r: r.get("event") == "end" and r["original_destination"] == f"198.51.100.91:{port}",
                        what="the second run's own end")
    finally:
        _stopped(second)
    records = _assert_one_end_each(second)
    assert not [r for r in records if r.get("original_destination", "").startswith("198.51.100.90:")], records
    skipped = re.search(r"ends of earlier runs skipped (\d+)", second.stderr())
    # At least the first run's three (an earlier test's entries to the same address may add more).
    assert skipped and int(skipped[1]) >= 3, second.stderr()


SHORT_TIMEOUTS = {"net.netfilter.nf_conntrack_udp_timeout": "2", "net.netfilter.nf_conntrack_icmp_timeout": "2"}


@pytest.fixture
def short_timeouts(lab_ns):
    """UDP and ICMP entries expire 2 s after their last packet (in the diverter's namespace only)."""
    ns = lab_ns.diverter_ns
    before = {key: ns.run("sysctl", "-n", key).stdout.strip() for key in SHORT_TIMEOUTS}
    ns.run("sysctl", "-qw", *(f"{k}={v}" for k, v in SHORT_TIMEOUTS.items()))
    try:
        yield lab_ns
    finally:
        ns.run("sysctl", "-qw", *(f"{k}={v}" for k, v in before.items()))


def test_udp_and_icmp_whose_entries_expire_before_the_stop_get_their_ends(short_timeouts):
    gw = short_timeouts
    div = _diverter(gw, "ends-expired")
    targets = [[f"198.51.100.{100 + n}", 5000 + n, f"expiring-{n}"] for n in range(20)]
    try:
        out = gw.client_run("fan-out", "udp", "--json", json.dumps(targets))
        assert all(r["ok"] for r in out["results"]), out
        for n in range(4):
            gw.client.run("ping", "-c1", "-W5", f"198.51.100.{130 + n}", timeout=15)
        harness.wait_for(lambda: len([r for r in div.log() if r.get("event") == "start"]) >= 24, 30,
                     "the start records of 20 UDP and 4 ICMP conversations")
        # Not a guess at how long something takes: the kernel's own deadline. Each
        # entry expires 2 s after its answer (within the second after its start);
        # past that, it is expired, reaped by conntrack's collector or not yet.
        last = max(datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
                   for r in div.log() if r.get("event") == "start")
        harness.wait_for(lambda: time.time() > last + 3.5, 10, "the last entry's expiry")
    finally:
        _stopped(div)
    records = _assert_one_end_each(div)
    ends = [r for r in records if r.get("event") == "end"]
    assert len(ends) == 24, records
    assert {r["ended"] for r in ends} <= {"timeout", "open"}, ends
    assert all(r["sent"]["packets"] == 1 for r in ends), ends
