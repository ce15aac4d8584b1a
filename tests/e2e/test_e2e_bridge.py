"""End to end: clients of one bridge reach each other only through the diverter.

Two clients of one bridge talk at layer 2. Their frames pass the diverter's
IP hooks only when the bridge hands them to netfilter
(net.bridge.bridge-nf-call-iptables / -ip6tables = 1, per network
namespace). With 0, client A's TCP, UDP and ping reached client B's own
services and nothing was logged; with 1, IPv6 between them died in
neighbour discovery (containment dropped it). Now, with either setting,
they are answered by the diverter, logged with B's address as the
destination and captured, and B sees none of them, nor A's broadcasts.
And a lab of 20 clients on one bridge, all talking at once: every record
names its client, its destination and its listener, and every start has
exactly one end.

The bridge table is the same on both queue backends (any_backend).
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from contextlib import contextmanager

import pytest

import harness
import netns

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

CLIENTS = 20
SETTINGS = pytest.mark.parametrize("bridge_nf", [0, 1], ids=["bridge-nf-call-0", "bridge-nf-call-1"])
# What a client sends another that must not reach it: all but ARP and neighbour discovery.
NOT_RESOLUTION = "not arp and not (icmp6 and (ip6[40] == 135 or ip6[40] == 136))"


def _dest(host: str, port: int | None = None) -> str:
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.fixture(scope="module")
def bridge_lab(tmp_path_factory):
    bl = harness.BridgeLab(netns, tmp_path_factory.mktemp("bridge-lab"), CLIENTS)
    try:
        yield bl
    finally:
        bl.close()


@contextmanager
def diverting(bl: harness.BridgeLab, bridge_nf: int, name: str, args: tuple[str, ...] = ()):
    """`nftdivert run ARGS` on the bridge's gateway with that setting; stopped
    cleanly at the end (containment stays), then removed."""
    bl.bridge_netfilter(bool(bridge_nf))
    div = harness.Diverter(bl.diverter_ns, bl.workdir, harness.config_text(), name=f"{name}-{bridge_nf}", args=args).start()
    try:
        assert f"bridge {harness.BRIDGE} ({CLIENTS} ports)" in div.stderr(), div.stderr()
        yield div
        div.stop_and_check()
    finally:
        div.kill()
        harness.nftdivert(bl.diverter_ns, "remove")
        harness.assert_clean(bl.diverter_ns)


@SETTINGS
def test_one_client_to_another_is_diverted_and_logged(bridge_lab, bridge_nf):
    a, b = bridge_lab.clients[0], bridge_lab.clients[1]
    port, tag = 7000 + bridge_nf * 10, uuid.uuid4().hex[:6]
    servers = [harness.serve_tcp(b, port, "B's own service"), harness.serve_udp(b, port + 1, "B's own service")]
    sources = " or ".join(f"src host {harness.bridge_client(0, v)}" for v in (4, 6))
    cap = harness.Capture(b, "eth0", bridge_lab.workdir / f"b-{bridge_nf}.pcap", f"({sources}) and {NOT_RESOLUTION}")
    pcap = bridge_lab.workdir / f"lateral-{bridge_nf}.pcap"
    try:
        cap.start()
        with diverting(bridge_lab, bridge_nf, "lateral", ("-w", str(pcap))) as div:
            for version in (4, 6):
                a_addr, b_addr = harness.bridge_client(0, version), harness.bridge_client(1, version)
                tcp = harness.run_client(a, "tcp", b_addr, str(port), f"tcp-{tag}")
                assert tcp["ok"] and tcp["reply"] == f"tcp-{tag}", tcp  # the diverter's echo, not B's service
                udp = harness.run_client(a, "udp", b_addr, str(port + 1), f"udp-{tag}")
                assert udp["ok"] and udp["reply"] == f"udp-{tag}" and udp["source"] == [b_addr, port + 1], udp
                a.run("ping", "-c1", "-W5", b_addr, timeout=15)
                icmp = "icmp" if version == 4 else "icmpv6"
                for proto, client, dest, listener in (
                        ("tcp", _dest(*tcp["local"]), _dest(b_addr, port), "tcp-echo"),
                        ("udp", _dest(a_addr, udp["local"][1]), _dest(b_addr, port + 1), "udp-echo"),
                        (icmp, a_addr, b_addr, "kernel")):
                    rec = div.wait_log(lambda r: r["event"] == "start" and r["protocol"] == proto
                                       and r["client"] == client, what=f"the start record of {proto} from {client}")
                    assert rec["original_destination"] == dest and rec["listener"] == listener, rec
                    assert rec["interface"] == harness.BRIDGE, rec
            # A broadcast: the diverter gets its copy (the queue path answers it), B none.
            harness.run_client(a, "udp", "192.0.2.255", str(port + 2), f"broadcast-{tag}", "--broadcast",
                           "--timeout", "0.5")
    finally:
        cap.stop()
        for server in servers:
            server.kill()
            server.wait()
    seen = cap.read()
    assert seen == [], f"client B received {len(seen)} packet(s) from client A:\n" + "\n".join(seen[:20])
    # The diverter's capture holds them, both ways, as the clients saw them.
    captured = harness.Capture(b, "eth0", pcap)
    for version in (4, 6):
        a_addr, b_addr = harness.bridge_client(0, version), harness.bridge_client(1, version)
        for what in (f"tcp port {port}", f"udp port {port + 1}", "icmp" if version == 4 else "icmp6"):
            for src, dst in ((a_addr, b_addr), (b_addr, a_addr)):
                assert captured.read(f"src host {src} and dst host {dst} and {what}"), (src, dst, what)


def _talk_steps(i: int, tag: str) -> list[list]:
    """What client i says: TCP and UDP to documentation addresses, IPv6 too,
    and a datagram to its neighbour on the bridge (who runs nothing)."""
    neighbour = harness.bridge_client((i + 1) % CLIENTS)
    return [["tcp", f"198.51.100.{i + 1}", 4000 + i, f"tcp-{i}-{tag}"],
            ["udp", f"203.0.113.{i + 1}", 5000 + i, f"udp-{i}-{tag}"],
            ["tcp", f"2001:db8:ffff::{i + 1:x}", 6000 + i, f"tcp6-{i}-{tag}"],
            ["udp", neighbour, 7000 + i, f"lateral-{i}-{tag}"]]


@SETTINGS
def test_twenty_clients_of_one_bridge_at_once(bridge_lab, bridge_nf):
    tag = uuid.uuid4().hex[:6]
    http = "198.51.100.200"
    with diverting(bridge_lab, bridge_nf, "many") as div:
        talkers, curls = [], []
        for i, client in enumerate(bridge_lab.clients):
            argv, env = harness._client("talk", "--json", json.dumps(_talk_steps(i, tag)))
            talkers.append(client.popen(*argv, env=env, text=True))
            curls.append(client.popen("curl", "-s", "-m", "20", "-o", "/dev/null", "-w",
                                      "%{http_code} %{local_ip} %{local_port}", f"http://{http}:8080/{tag}",
                                      text=True))
        expected = set()
        for i, (talker, curl) in enumerate(zip(talkers, curls)):
            out, err = talker.communicate(timeout=60)
            assert talker.returncode == 0, f"client {i}: {err}"
            for r in json.loads(out):
                proto, host, port, payload = r["step"]
                assert r["ok"] and r["reply"] == payload, f"client {i}: {r}"
                me = harness.bridge_client(i, 6 if ":" in host else 4)  # an unconnected UDP socket's is the wildcard
                expected.add((proto, _dest(me, r["local"][1]), _dest(host, port), f"{proto}-echo"))
            out, err = curl.communicate(timeout=60)
            code, local_ip, local_port = out.split()
            assert curl.returncode == 0 and code == "200", f"client {i}: curl {curl.returncode} {out!r} {err!r}"
            expected.add(("tcp", _dest(local_ip, int(local_port)), _dest(http, 8080), "tcp-echo"))
    records = div.log()  # complete: the run has stopped, and ended what was still tracked
    starts = [r for r in records if r["event"] == "start"]
    ends = [r for r in records if r["event"] == "end"]
    got = {(r["protocol"], r["client"], r["original_destination"], r["listener"]) for r in starts}
    assert len(expected) == CLIENTS * 5 and got == expected, \
        f"missing: {sorted(expected - got)[:10]}\nunexpected: {sorted(got - expected)[:10]}"
    assert len(starts) == len(expected), Counter(map(str, starts)).most_common(3)
    assert {r["interface"] for r in starts} == {harness.BRIDGE}, starts[:3]
    assert {r["listener_port"] for r in starts} == {harness.LISTENER_PORT}, starts[:3]
    # One start, one end, the same id and identity.
    by_id = {r["id"]: r for r in starts}
    assert len(by_id) == len(starts), "two starts share an id"
    assert sorted(r["id"] for r in ends) == sorted(by_id), \
        f"ends without a start or starts without exactly one end: {Counter(r['id'] for r in ends).most_common(3)}"
    for end in ends:
        start = by_id[end["id"]]
        assert (end["client"], end["original_destination"], end["listener"]) == \
               (start["client"], start["original_destination"], start["listener"]), (start, end)


def _assert_lateral_tcp_diverted(div, a, a_index: int, b_addr: str, port: int, payload: str) -> None:
    r = harness.run_client(a, "tcp", b_addr, str(port), payload)
    assert r["ok"] and r["reply"] == payload, r
    client = _dest(harness.bridge_client(a_index), r["local"][1])
    rec = div.wait_log(lambda x: x["event"] == "start" and x["client"] == client, what=f"the start of {client}")
    assert rec["original_destination"] == _dest(b_addr, port) and rec["listener"] == "tcp-echo", rec


def test_a_client_that_joins_while_it_runs(bridge_lab):
    """run follows the bridge: a new port gets into the map, and when the
    bridge takes the new port's lower MAC as its own, every port follows."""
    with diverting(bridge_lab, 0, "join") as div:
        before = bridge_lab.bridge_address()
        joined = bridge_lab.add_client(netns, CLIENTS, port_address="02:00:00:00:00:01")
        try:
            assert bridge_lab.bridge_address() == "02:00:00:00:00:01" != before
            want = {f"p{i}": "02:00:00:00:00:01" for i in range(CLIENTS + 1)}
            harness.wait_for(lambda: bridge_lab.client_ports() == want, 10, "the map to follow the bridge",
                         detail=lambda: str(bridge_lab.client_ports()))
            _assert_lateral_tcp_diverted(div, joined, CLIENTS, harness.bridge_client(0), 7100, "from-newcomer")
            _assert_lateral_tcp_diverted(div, bridge_lab.clients[0], 0, harness.bridge_client(CLIENTS), 7101, "to-it")
        finally:
            bridge_lab.remove_client(joined)
        harness.wait_for(lambda: len(bridge_lab.client_ports()) == CLIENTS, 10, "the map to forget the port")


def test_after_kill_9_nothing_crosses_and_the_next_run_takes_over(bridge_lab):
    bridge_lab.bridge_netfilter(False)
    a, b = bridge_lab.clients[2], bridge_lab.clients[3]
    b_addr = harness.bridge_client(3)
    server = harness.serve_tcp(b, 7200, "B's own service")
    try:
        killed = harness.Diverter(bridge_lab.diverter_ns, bridge_lab.workdir, harness.config_text(), name="killed").start()
        killed.kill()
        r = harness.run_client(a, "tcp", b_addr, "7200", "after-kill", timeout=30)
        assert r.get("reply") != "B's own service", r  # the stale bridge table still sends it up: nobody answers
        with diverting(bridge_lab, 0, "next") as div:  # over the stale tables
            _assert_lateral_tcp_diverted(div, a, 2, b_addr, 7200, "taken-over")
    finally:
        server.kill()
        server.wait()


def test_a_port_nobody_has_seen_yet_is_dropped_not_bridged(bridge_lab):
    """`apply` alone fills the map once; nothing follows the bridge. A client
    that joins after it gets nothing across to another client (every bridge
    is on the client side): its ping is dropped by the bridge table, counted,
    and never reaches its neighbour. (The ping to a known port's neighbour
    would be answered: ICMP echo needs no worker.)"""
    bridge_lab.bridge_netfilter(False)
    config = bridge_lab.workdir / "apply.toml"
    config.write_text(harness.config_text())
    harness.nftdivert(bridge_lab.diverter_ns, "apply", "-c", str(config))
    neighbour = bridge_lab.clients[4]
    cap = harness.Capture(neighbour, "eth0", bridge_lab.workdir / "unseen.pcap", f"icmp and {NOT_RESOLUTION}")
    joined = None
    try:
        cap.start()
        assert bridge_lab.clients[5].run("ping", "-c1", "-W5", harness.bridge_client(4), timeout=15, check=False) \
            .returncode == 0, "a known port's ping is answered (by the diverter's kernel)"
        joined = bridge_lab.add_client(netns, CLIENTS + 1)
        ping = joined.run("ping", "-c1", "-W1", harness.bridge_client(4), timeout=15, check=False)
        assert ping.returncode != 0, ping.stdout
        rules = [o["rule"] for o in harness.nft_json(bridge_lab.diverter_ns, "list", "chain", "bridge", harness.TABLE,
                                                 "lateral") if "rule" in o]
        assert rules[-1]["expr"][0]["counter"]["packets"] >= 1 and "drop" in rules[-1]["expr"][-1], rules[-1]
    finally:
        cap.stop()
        if joined is not None:
            bridge_lab.remove_client(joined)
        harness.nftdivert(bridge_lab.diverter_ns, "remove")
    seen = cap.read(f"src host {harness.bridge_client(CLIENTS + 1)}")
    assert seen == [], "\n".join(seen)
    assert cap.read(f"src host {harness.bridge_client(5)}") == []
