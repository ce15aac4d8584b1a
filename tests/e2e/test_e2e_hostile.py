"""End to end, real kernel, real packets: what a hostile or merely odd client
meets. The diverter must not give itself away: a port is bound only for the
family and address a conversation would reach, and odd packets (IPv4
options, IPv6 extension headers, an urgent byte, an empty or broadcast
datagram) get the answer an ordinary one gets.

Lab and client programs: tests/harness.py.
"""

from __future__ import annotations

import json
import re

import pytest

import harness

# What the worker parses and the ruleset's sets decide, not how packets reach the
# queue: the host tier proves it, the VM tier keeps to the backend's own paths.
pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]


@pytest.fixture
def div(gw):
    return gw.ensure()


def _serve(ns, servers):
    procs = []
    try:
        for bind, port in servers:
            procs.append(harness.serve_tcp(ns, port, f"own-{bind}-{port}", bind=bind))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs):
    for proc in procs:
        proc.kill()
        proc.wait(timeout=5)


# ---- bound ports: only for the family and address a conversation reaches ----------------

def test_loopback_services_do_not_make_a_port_bound_for_gateway_clients(gw, div):
    ns = gw.diverter_ns
    procs = _serve(ns, [("127.0.0.1", 9000), ("::1", 9001)])
    try:
        # The kernel knows them, each for its own address only.
        harness.wait_bound_set(ns, "tcp", 9000, address="127.0.0.1")
        harness.wait_bound_set(ns, "tcp", 9001, address="::1")
        assert not [e for e in harness.bound_elements(ns, "tcp", 4) if e[1] in (9000, 9001) and e[0] != "127.0.0.1"]
        assert not [e for e in harness.bound_elements(ns, "tcp", 6) if e[1] in (9000, 9001) and e[0] != "::1"]
        for host, port in (("198.51.100.7", 9000), ("2001:db8::7", 9001)):
            r = gw.tcp(host, port, f"echo-{port}")
            assert r["ok"] and r["reply"] == f"echo-{port}", f"{host}:{port}: {r}"  # the default listener's echo
            assert r["peer"] == [host, port], r
        lines = gw.log_barrier(div)
        got = {x["original_destination"] for x in lines}
        assert {"198.51.100.7:9000", "[2001:db8::7]:9001"} <= got, lines
    finally:
        _stop(procs)


def test_an_ipv4_only_service_leaves_ipv6_clients_diverted(gw, div):
    ns = gw.diverter_ns
    procs = _serve(ns, [("0.0.0.0", 8000)])
    try:
        harness.wait_bound_set(ns, "tcp", 8000, address="0.0.0.0/0")
        assert not [e for e in harness.bound_elements(ns, "tcp", 6) if e[1] == 8000]
        v4 = gw.tcp("198.51.100.8", 8000, "to-the-service")
        assert v4["ok"] and v4["reply"] == "own-0.0.0.0-8000", v4  # bound for IPv4: its own socket
        v6 = gw.tcp("2001:db8::8", 8000, "echo-v6-8000")
        assert v6["ok"] and v6["reply"] == "echo-v6-8000", v6  # not for IPv6: the default listener
        assert v6["peer"] == ["2001:db8::8", 8000], v6
    finally:
        _stop(procs)


# ---- answers that do not give the diverter away ----------------------------------------

# Options that change nothing on the way: IPv4 NOP, NOP, NOP, end of list;
# an IPv6 options header of one PadN option (its next-header byte is the kernel's to set).
IPV4_OPTIONS = "01010100"
IPV6_OPTIONS = "0000010400000000"


def test_an_empty_udp_datagram_is_echoed(gw, div):
    for host in ("198.51.100.31", "2001:db8::31"):
        port = gw.fresh_port()
        r = gw.udp(host, port, "")
        assert r["ok"] and r["reply"] == "", f"{host}: {r}"
        assert r["source"] == [host, port], r


# The kernel path cannot: NAT would answer from the broadcast or multicast
# address itself, which the client drops as a martian source (README).
@pytest.mark.queue_path
def test_a_broadcast_datagram_is_answered_from_the_port_asked_for(gw, div):
    # To the client link's broadcast address: the diverter itself receives it
    # (no NAT: it is already ours) and answers from its own address, as a
    # service there would, but from the port the client asked for.
    port = gw.fresh_port()
    r = gw.client_run("udp", "192.0.2.255", str(port), "to-everyone", "--broadcast")
    assert r["ok"] and r["reply"] == "to-everyone", r
    assert r["source"] == [harness.DIV_CLIENT4, port], r


@pytest.mark.queue_path  # as above
def test_an_ipv6_all_nodes_datagram_is_answered_from_the_port_asked_for(gw, div):
    # Link-scope multicast: answered from the diverter's link-local address.
    port = gw.fresh_port()
    r = gw.client_run("udp", "ff02::1%eth0", str(port), "to-all-nodes")
    assert r["ok"] and r["reply"] == "to-all-nodes", r
    assert r["source"][0].startswith("fe80:") and r["source"][1] == port, r


@pytest.mark.parametrize(("host", "option"), [
    ("198.51.100.32", ["--ipopts", IPV4_OPTIONS]),
    ("2001:db8::32", ["--hopopts", IPV6_OPTIONS]),
    ("2001:db8::33", ["--dstopts", IPV6_OPTIONS]),
], ids=["ipv4-options", "ipv6-hop-by-hop", "ipv6-destination-options"])
def test_packets_with_ip_options_or_extension_headers_are_answered(gw, div, host, option):
    port = gw.fresh_port()
    t = gw.client_run("tcp", host, str(port), "with-options", "--timeout", "3", *option)
    assert t["ok"] and t["reply"] == "with-options" and t["peer"] == [host, port], t
    u = gw.client_run("udp", host, str(port), "with-options", "--timeout", "3", *option)
    assert u["ok"] and u["reply"] == "with-options" and u["source"] == [host, port], u


def test_the_tcp_urgent_byte_is_echoed_in_place(gw, div):
    r = gw.client_run("tcp", "198.51.100.34", str(gw.fresh_port()), "before!after", "--urgent", "6")
    assert r["ok"] and r["reply"] == "before!after", r


# ---- admission: one client's flood of new conversations stops before the queue -------------

SHARE = 50  # new TCP conversations a second for the client: far below the flood


@pytest.mark.queue_path  # admission protects the queue; the kernel path has none
def test_a_clients_syns_beyond_its_share_are_dropped_before_the_queue_and_counted(gw):
    div = gw.ensure(new_tcp_per_source=SHARE)
    flood = gw.client_run("synflood", harness.CLIENT4, "198.18.0.0/16", "3000", "--seconds", "1", timeout=60)
    assert flood["sent"] == 3000, flood
    # The token bucket lets through at most its burst plus its rate for the time the flood took.
    most_admitted = SHARE // 2 + SHARE * (flood["seconds"] + 1)
    status = harness.nftdivert(gw.diverter_ns, "status").stdout
    print(f"\n{status}")
    said = re.search(r"admission: dropped tcp (\d+), udp (\d+) new conversations", status)
    assert said and int(said[1]) >= 3000 - most_admitted and said[2] == "0", status
    worker = re.search(r"conversations (\d+) ", status)
    assert worker and int(worker[1]) <= most_admitted, status
    # The share is per protocol: the same client's UDP is answered at once,
    # and its TCP again once its share has refilled (SYNs are retransmitted).
    u = gw.udp("198.51.100.61", gw.fresh_port(), "udp-meanwhile")
    assert u["ok"] and u["reply"] == "udp-meanwhile", u
    t = gw.tcp("198.51.100.61", gw.fresh_port(), "tcp-after")
    assert t["ok"] and t["reply"] == "tcp-after", t
    # The run's final counters say it too.
    gw.stop()
    final = re.search(r"admission dropped tcp (\d+), udp 0 new conversations", div.stderr())
    assert final and int(final[1]) >= int(said[1]), div.stderr()


# ---- spoofed sources: no answer leaves by another interface ------------------------------

# Sources the client does not own: answers to them would be routed out to the
# internet side (ARP for the first, the default route for the second).
SPOOFED4, SPOOFED6 = "203.0.113.99", "2001:db8:ffff::99"
SPOOF_FILTER = f"host {SPOOFED4} or host {SPOOFED6}"


def _spoofed_counter(ns) -> int:
    said = re.search(r"spoofed: dropped (\d+) packets", harness.nftdivert(ns, "status").stdout)
    return int(said[1]) if said else -1


def _capture_barrier(gw) -> None:
    """Once the diverter's own ping of this size is in the internet capture,
    everything sent before it is too."""
    size = 1000 + gw.fresh_port() % 400
    gw.diverter_ns.run("ping", "-c1", "-W5", "-s", str(size), harness.INET4, timeout=10)
    harness.wait_for(lambda: gw.internet_capture.read(f"icmp and greater {size}"), 10, "the capture barrier")


def test_spoofed_sources_get_no_answer_and_are_counted(gw, div):
    before = _spoofed_counter(gw.diverter_ns)
    port = gw.fresh_port()
    packets = [[src, dst, proto, port, f"EXFIL-{proto}-{src}"]
               for src, dst in ((SPOOFED4, "198.51.100.5"), (SPOOFED6, "2001:db8::5"))
               for proto in ("icmp", "tcp", "udp")]
    assert gw.client_run("spoof", "--json", json.dumps(packets))["sent"] == 6
    # The same from the client's own addresses is answered: the barrier for the
    # answers (the queue and the listener keep their order), then the capture's.
    for src, dst in ((harness.CLIENT4, "198.51.100.5"), (harness.CLIENT6, "2001:db8::5")):
        t = gw.tcp(dst, port, f"own-{src}")
        assert t["ok"] and t["reply"] == f"own-{src}", t
        u = gw.udp(dst, port, f"own-{src}")
        assert u["ok"] and u["reply"] == f"own-{src}", u
    _capture_barrier(gw)
    leaked = gw.internet_capture.read(SPOOF_FILTER)
    assert leaked == [], "answers to spoofed sources left the diverter:\n" + "\n".join(leaked)
    assert _spoofed_counter(gw.diverter_ns) == before + 6, harness.nftdivert(gw.diverter_ns, "status").stdout
    gw.stop()  # the run's final counters say it too
    final = re.search(r"spoofed sources: dropped (\d+) packets", div.stderr())
    assert final and int(final[1]) == before + 6, div.stderr()


def test_a_spoofed_packet_that_expires_here_gets_no_icmp_error(gw):
    """Routed onward (a left-alone host), a packet with one hop left makes the
    kernel send "time exceeded", quoting the packet, before any forward hook:
    containment cannot stop it, the reverse-path check does."""
    div = gw.ensure(hosts=["198.51.100.200/32", "2001:db8:ffff::200/128"])
    before = _spoofed_counter(gw.diverter_ns)
    packets = [[SPOOFED4, "198.51.100.200", "udp", 9, "EXFIL-ttl", 1],
               [SPOOFED6, "2001:db8:ffff::200", "udp", 9, "EXFIL-ttl", 1]]
    assert gw.client_run("spoof", "--json", json.dumps(packets))["sent"] == 2
    # The same from the client's own addresses gets its error: the barrier.
    for src, dst in ((harness.CLIENT4, "198.51.100.200"), (harness.CLIENT6, "2001:db8:ffff::200")):
        cap = harness.Capture(gw.client, "eth0", gw.workdir / f"ttl-{gw.fresh_port()}.pcap", "icmp or icmp6").start()
        try:
            gw.client_run("spoof", "--json", json.dumps([[src, dst, "udp", 9, "own", 1]]))
            harness.wait_for(lambda: [p for p in cap.read() if "exceeded" in p], 10, f"time exceeded for {src}")
        finally:
            cap.stop()
    _capture_barrier(gw)
    leaked = gw.internet_capture.read(SPOOF_FILTER)
    assert leaked == [], "errors about spoofed packets left the diverter:\n" + "\n".join(leaked)
    assert _spoofed_counter(gw.diverter_ns) == before + 2
    assert div.alive()


def test_dhcp_and_duplicate_address_detection_sources_still_pass(gw, div):
    """Before it has an address, a host speaks from 0.0.0.0 (DHCP, to the
    link's broadcast) and :: (duplicate address detection, MLD: to link
    multicast); link-local sources are every host's. The reverse-path check
    lets them through, uncounted."""
    before = _spoofed_counter(gw.diverter_ns)
    port = gw.fresh_port()
    receiver = harness.receive_udp(gw.diverter_ns, port, 3)
    try:
        for address in ("0.0.0.0/0", "::/0"):  # its port is bound: the datagrams are not diverted
            harness.wait_bound_set(gw.diverter_ns, "udp", port, address=address)
        packets = [["0.0.0.0", "255.255.255.255", "udp", port, "DISCOVER"], ["::", "ff02::1", "udp", port, "DAD"],
                   ["fe80::99", "ff02::1", "udp", port, "LINK-LOCAL"]]
        assert gw.client_run("spoof", "--device", "eth0", "--json", json.dumps(packets))["sent"] == 3
        out, _ = receiver.communicate(timeout=30)
    finally:
        receiver.kill()
        receiver.wait(timeout=5)
    assert sorted(json.loads(out)["sources"]) == ["0.0.0.0", "::", "fe80::99"], out
    assert _spoofed_counter(gw.diverter_ns) == before


# A scanner that never retransmits, far over its share: every port it tried
# is in the log, answered (a start record) or dropped (an admission record
# naming the destination it asked for), and the records count every drop.
@pytest.mark.load
@pytest.mark.queue_path  # admission protects the queue; the kernel path has none
@pytest.mark.parametrize("host", ["198.51.100.30", "2001:db8:ffff::30"])
def test_a_scan_over_the_share_logs_every_attempt_and_which_were_dropped(gw, host):
    div = gw.ensure(new_tcp_per_source=SHARE)
    scan = gw.client.run("nmap", "-n", "-sT", "-Pn", "-p", "1-1000", "--max-retries", "0", "-oG", "-",
                         *(["-6"] if ":" in host else []), host, timeout=300)
    asked = f"[{host}]:" if ":" in host else f"{host}:"
    client = harness.CLIENT6 if ":" in host else harness.CLIENT4
    opened = {int(p) for p in re.findall(r"(\d+)/open/tcp", scan.stdout)}
    gw.stop()  # the last second's admission record is written at the stop
    counted = re.search(r"admission dropped tcp (\d+), udp 0 new conversations", div.stderr())
    recs = div.log()
    answered = {int(r["original_destination"].rsplit(":", 1)[1]) for r in recs
                if r.get("event") == "start" and r["original_destination"].startswith(asked)}
    drops = [r for r in recs if r.get("event") == "admission"]
    dropped = {int(d.rsplit(":", 1)[1]) for r in drops for d in r["original_destinations"]}
    print(f"\nnmap: {len(opened)} open; the log: {len(answered)} answered, {len(dropped)} dropped "
          f"in {len(drops)} records")
    assert all(r["client_address"] == client and r["protocol"] == "tcp" for r in drops), drops
    assert all(d.startswith(asked) for r in drops for d in r["original_destinations"]), drops
    assert all(r["destinations"] == len(r["original_destinations"]) for r in drops), "some were left unnamed"
    assert answered | dropped == set(range(1, 1001)), sorted(set(range(1, 1001)) - answered - dropped)[:20]
    assert set(range(1, 1001)) - opened <= dropped  # what the scan saw as filtered was dropped, and says so
    assert dropped and opened >= answered - dropped
    assert counted and sum(r["dropped"] for r in drops) == int(counted[1]), div.stderr()
