"""End to end: every conversation keeps its identity.

One client port towards many addresses on one port makes conversations that
look alike where the worker first sees them (input -150); the kernel tells
them apart only later (NAT at input 100, or at postrouting in local mode).
Each must still be answered from the address it asked for and logged once,
under its own destination. And a datagram too large for the queue's copy is
refused visibly. Backend: NFTDIVERT_TEST_BACKEND, as in test_e2e.py.
"""

from __future__ import annotations

import json
import re
import socket
import uuid

import pytest

import harness
import netns

pytestmark = pytest.mark.kernel


def _dest(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _failed(r: dict) -> list[dict]:
    """Results not answered, or (UDP) answered from somewhere else than asked."""
    return [x for x in r["results"] if not x["ok"] or x.get("source", x["target"]) != x["target"]]


def _kernel_remaps(ns) -> int | None:
    out = harness.nftdivert(ns, "status").stdout
    m = re.search(r"kernel remaps (\d+)", out)
    return int(m[1]) if m else None


# ---- gateway mode ------------------------------------------------------------------------

# The VM tier keeps the TCP case: the replies of 49 remapped conversations
# through the native queue at -300. The rest is the worker's own logic, the
# same on both backends: the host covers it (any_backend).
@pytest.mark.parametrize("proto, subnet, port", [("tcp", 1, 4444),
                                                 pytest.param("udp", 2, 9999, marks=pytest.mark.any_backend)])
def test_one_client_port_towards_50_addresses_on_one_port(gw, proto, subnet, port):
    div = gw.ensure()
    sport, tag = gw.fresh_port(), uuid.uuid4().hex[:6]
    targets = [[f"198.18.{subnet}.{i}", port, f"{proto}-{i}-{tag}"] for i in range(1, 51)]
    r = gw.client_run("fan-out", proto, "--sport", str(sport), "--json", json.dumps(targets), timeout=120)
    failed = _failed(r)
    assert not failed, f"{len(failed)} of 50 not answered from the address asked for: {failed[:5]}"

    lines = gw.log_barrier(div)
    mine = [x for x in lines if x["client"] == f"{harness.CLIENT4}:{sport}" and x["protocol"] == proto]
    assert sorted(x["original_destination"] for x in mine) == sorted(_dest(h, p) for h, p, _ in targets), mine
    assert {x["event"] for x in mine} == {"start"} and len({x["id"] for x in mine}) == 50, mine
    if harness.stats_writable() and not harness.KERNEL_PATH:  # 49 reached the listener from a port the kernel chose
        assert harness.wait_for(lambda: (_kernel_remaps(gw.diverter_ns) or 0) >= 49, 5, "kernel remaps counted")


@pytest.mark.any_backend
def test_udp_socket_answered_by_one_address_then_sends_to_another_on_the_same_port(gw):
    """P2P and fallback C2: one unconnected socket (an ordinary ephemeral port),
    first answered by 198.51.100.50:9999, then talking to .51:9999."""
    div = gw.ensure()
    tag = uuid.uuid4().hex[:6]
    targets = [["198.51.100.50", 9999, f"first-{tag}"], ["198.51.100.51", 9999, f"second-{tag}"]]
    r = gw.client_run("fan-out", "udp", "--one-by-one", "--json", json.dumps(targets))
    assert not _failed(r), r
    assert [x["source"] for x in r["results"]] == [["198.51.100.50", 9999], ["198.51.100.51", 9999]]
    lines = gw.log_barrier(div)
    mine = [x["original_destination"] for x in lines if x["client"] == f"{harness.CLIENT4}:{r['local']}"]
    assert sorted(mine) == ["198.51.100.50:9999", "198.51.100.51:9999"], lines


@pytest.mark.any_backend
def test_ipv6_one_client_port_towards_10_addresses(gw):
    div = gw.ensure()
    sport, tag = gw.fresh_port(), uuid.uuid4().hex[:6]
    targets = [[f"2001:db8:ffff::1:{i:x}", 4444, f"v6-{i}-{tag}"] for i in range(1, 11)]
    for proto in ("tcp", "udp"):
        r = gw.client_run("fan-out", proto, "--sport", str(sport), "--json", json.dumps(targets), timeout=60)
        assert not _failed(r), (proto, _failed(r))
    lines = gw.log_barrier(div)
    for proto in ("tcp", "udp"):
        mine = [x["original_destination"] for x in lines
                if x["client"] == f"[{harness.CLIENT6}]:{sport}" and x["protocol"] == proto]
        assert sorted(mine) == sorted(_dest(h, p) for h, p, _ in targets), (proto, mine)


@pytest.mark.slow
def test_1000_concurrent_connections_to_1000_addresses_on_443(gw):
    """Ordinary clients: Linux gives several of these connections the same
    ephemeral port (towards different addresses), so the kernel remaps some."""
    div = gw.ensure()
    tag = uuid.uuid4().hex[:6]
    targets = [[f"198.18.{10 + i // 250}.{i % 250 + 1}", 443, f"c{i}-{tag}"] for i in range(1000)]
    r = gw.client_run("many", "--json", json.dumps(targets), "--timeout", "60", timeout=300)
    assert r["failures"] == [] and r["ok"] == 1000, r["failures"][:10]
    assert r["client_ports_shared"] > 0, "no client port was used twice: the test proves nothing"
    want = sorted((f"{harness.CLIENT4}:{lport}", _dest(h, p)) for h, p, lport in r["sockets"])
    asked = {_dest(h, p) for h, p, _ in targets}

    def logged() -> list:
        return sorted((x["client"], x["original_destination"]) for x in div.log()
                      if x.get("event") == "start" and x["original_destination"] in asked)

    harness.wait_for(lambda: len(logged()) >= 1000, 30, "1000 log lines",
                 detail=lambda: f"{len(logged())} logged")
    got = logged()
    assert got == want, f"{len(set(got) ^ set(want))} log lines differ, e.g. {sorted(set(got) ^ set(want))[:6]}"
    print(f"\n1000 concurrent connections to 1000 addresses on :443: all answered and logged in "
          f"{r['seconds']:.2f}s; {r['client_ports_shared']} client ports in use more than once")


def _dropped(ns) -> int:
    m = re.search(r"dropped (\d+),", harness.nftdivert(ns, "status").stdout)
    return int(m[1]) if m else -1


@pytest.mark.any_backend
@pytest.mark.kernel_path
def test_an_8000_byte_udp_datagram_is_answered_whole_on_the_kernel_path(gw):
    """No queue, so no copy limit: the datagram goes to the listener whole."""
    gw.ensure()
    for host in ("198.51.100.78", "2001:db8:ffff::78"):
        targets = [[host, 7778, "small"], [host, 7778, "d" * 8000], [host, 7778, "after"]]
        r = gw.client_run("fan-out", "udp", "--one-by-one", "--timeout", "3", "--json", json.dumps(targets))
        assert [x["ok"] for x in r["results"]] == [True, True, True], r["results"]
        assert not _failed(r), r["results"]


@pytest.mark.any_backend  # NetfilterQueue's copy limit, whichever backend queued the packet
@pytest.mark.queue_path
def test_an_8000_byte_udp_datagram_is_dropped_counted_and_reported_once(gw):
    """Beyond the queue's copy (4016 bytes) a datagram cannot be rewritten: it
    is dropped (like over a smaller MTU), counted, and reported once; the
    conversation goes on around it."""
    if not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker cannot publish its counters")
    gw.stop()
    div = gw.ensure()  # fresh counters
    for n, (host, fill) in enumerate((("198.51.100.77", "a"), ("198.51.100.77", "b"), ("2001:db8:ffff::77", "c")), 1):
        targets = [[host, 7777, f"small-{n}"], [host, 7777, fill * 8000], [host, 7777, f"after-{n}"]]
        for _ in range(3):
            r = gw.client_run("fan-out", "udp", "--one-by-one", "--timeout", "1", "--json", json.dumps(targets))
            assert [x["ok"] for x in r["results"]] == [True, False, True], r["results"]
            try:
                harness.wait_for(lambda: _dropped(gw.diverter_ns) >= n, 3, f"{n} dropped")
                break
            except AssertionError:
                continue  # one fragment lost on a busy machine loses the datagram: send it again
        assert _dropped(gw.diverter_ns) == n
    gw.stop()  # exit 0, nothing left, errors 0
    err = div.stderr()
    warnings = [line for line in err.splitlines() if "larger than the queue copies" in line]
    assert len(warnings) == 1, err
    assert re.search(r"dropped 3, errors 0;", err), err


SO_TIMESTAMP = 29  # <asm-generic/socket.h>; Python names only SO_TIMESTAMP in some builds


def _waiting(ns) -> dict[int, int]:
    """Queue number -> packets the kernel holds there without a verdict (/proc, now)."""
    return {int(line.split()[0]): int(line.split()[2]) for line in harness.queue_bindings(ns)}


@pytest.mark.any_backend
@pytest.mark.queue_path
def test_large_datagrams_with_timestamps_on_are_dropped_and_never_stall_the_queue(gw):
    """While any socket asks for SO_TIMESTAMP (a `ping` does), every queued
    packet carries a timestamp: the message of a datagram beyond the copy
    range outgrew NetfilterQueue's 4096-byte buffer, was cut off without a
    verdict, and after 1,024 of them the incoming queue was full for good."""
    if not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker cannot publish its counters")
    gw.stop()
    div = gw.ensure()  # fresh counters
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stamped:
        stamped.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)  # the kernel's timestamps on, for everyone
        blast = gw.client_run("udpblast", "198.51.100.77", "1030", "5000", "7000", "1000", "--seconds", "2",
                              timeout=120)
        assert blast["sent"] == 1030, blast
        # New conversations of every kind are answered: the queue, in order, got past the blast.
        for host in ("198.51.100.78", "2001:db8:ffff::78"):
            port = gw.fresh_port()
            t = gw.tcp(host, port, f"tcp-after-{host}")
            assert t["ok"] and t["reply"] == f"tcp-after-{host}", t
            u = gw.udp(host, port, f"udp-after-{host}")
            assert u["ok"] and u["reply"] == f"udp-after-{host}", u
    assert _waiting(gw.diverter_ns) == {q: 0 for q in harness.ALL_QUEUES}
    # Each datagram that reached the queue is dropped and counted (a fragment lost
    # on the way loses its datagram before the queue; admission may drop some).
    status = harness.nftdivert(gw.diverter_ns, "status").stdout
    print(f"\n{status}")
    harness.wait_for(lambda: _dropped(gw.diverter_ns) >= 1000, 10, "1000 dropped",
                 detail=lambda: harness.nftdivert(gw.diverter_ns, "status").stdout)
    gw.stop()  # exit 0, nothing left, errors 0
    (name, number), _ = harness.client_queues(harness.CLIENT4)  # the queue of the client's worker
    assert re.search(rf"kernel: .*\b{name} queue {number} dropped 0 \(queue full\) \+ 0 \(socket full\) \+ 0 "
                     r"\(unreadable\), waiting 0",
                     div.stderr()), div.stderr()


# ---- local mode -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local(tmp_path_factory):
    with harness.local_lab(netns, tmp_path_factory.mktemp("e2e-identity-local")) as pair:
        yield pair


@pytest.mark.any_backend  # local mode's native queue: test_e2e_load's local tests in the VM tier
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_local_mode_one_client_port_towards_10_addresses(local, proto):
    """Here the kernel remaps at postrouting, before the worker sees the
    packets: the log still names the client's own port, from conntrack."""
    host, div = local
    sport = 21000 if proto == "tcp" else 21001
    tag = uuid.uuid4().hex[:6]
    targets = [[f"198.18.3.{i}", 4444, f"{proto}-{i}-{tag}"] for i in range(1, 11)]
    r = harness.run_client(host, "fan-out", proto, "--sport", str(sport), "--json", json.dumps(targets), timeout=60)
    assert not _failed(r), _failed(r)
    lines = harness.log_barrier(host, div, 40100 + (proto == "udp"))
    mine = [x for x in lines if x["client"].endswith(f":{sport}") and x["protocol"] == proto]
    assert sorted(x["original_destination"] for x in mine) == sorted(_dest(h, p) for h, p, _ in targets), lines


@pytest.mark.any_backend
@pytest.mark.queue_path
def test_local_mode_datagrams_up_to_loopbacks_mtu_with_timestamps_on_never_stall_the_queue(local):
    """Over loopback (MTU 65536) a datagram is queued whole, up to 64 KiB: its
    message is cut to the copy range, and still read whole."""
    host, div = local
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stamped:
        stamped.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        for dest in ("198.18.4.1", "2001:db8:4::1"):
            blast = harness.run_client(host, "udpblast", dest, "1100", "60000", "7000", "1000", "--seconds", "2",
                                   timeout=120)
            assert blast["sent"] == 1100, blast
        for dest in ("198.18.4.2", "2001:db8:4::2"):
            t = harness.run_client(host, "tcp", dest, "4321", f"tcp-after-{dest}")
            assert t["ok"] and t["reply"] == f"tcp-after-{dest}", t
            u = harness.run_client(host, "udp", dest, "4321", f"udp-after-{dest}")
            assert u["ok"] and u["reply"] == f"udp-after-{dest}", u
    assert _waiting(host) == {q: 0 for q in harness.ALL_QUEUES}
