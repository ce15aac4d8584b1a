"""End to end under load: hundreds of concurrent conversations, bulk transfers
(gateway over veth, local mode over loopback), and local mode's exemptions."""

from __future__ import annotations

import json
import uuid

import pytest

import harness
import netns

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """One host in local mode: its own programs' connections are diverted, root's
    only (nobody is left alone)."""
    with harness.local_lab(netns, tmp_path_factory.mktemp("e2e-local"), users=["nobody"]) as pair:
        yield pair


# ---- 6. load -------------------------------------------------------------------------

def _diagnose(gw, div, r: dict, cap: harness.Capture) -> str:
    """What the kernel and the worker saw, for a failed load run."""
    kinds: dict[str, int] = {}
    for _, _, why in r["failures"]:
        kinds[why.split("[")[0].split("(")[0][:60]] = kinds.get(why.split("[")[0].split("(")[0][:60], 0) + 1
    host, port, _ = r["failures"][0]
    packets = [line for line in cap.read() if f".{port} " in line or f".{port}:" in line]
    status = harness.nftdivert(gw.diverter_ns, "status", check=False).stdout
    queues = gw.diverter_ns.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False).stdout
    return (f"{len(r['failures'])} failed: {kinds}\nfirst: {r['failures'][0]}\n"
            f"client packets of {host}:{port}:\n" + "\n".join(packets[:30]) +
            f"\nstatus:\n{status}\nnfnetlink_queue (queue pid total mode range dropped user_dropped id 1):\n{queues}"
            f"\nworker stderr:\n{div.stderr()[-2000:]}")


@pytest.mark.load
def test_200_concurrent_connections_to_200_addresses(gw, tmp_path):
    div = gw.ensure()
    tag = uuid.uuid4().hex[:8]
    targets = [[f"198.51.100.{i}", 30000 + i, f"v4-{i}-{tag}-" + "x" * i] for i in range(1, 101)]
    targets += [[f"2001:db8:ffff::{i:x}", 31000 + i, f"v6-{i}-{tag}-" + "y" * i] for i in range(1, 101)]
    cap = harness.Capture(gw.client, "eth0", tmp_path / "client.pcap", "tcp and portrange 30001-31100").start()
    try:
        r = gw.client_run("many", "--json", json.dumps(targets), "--timeout", "30", timeout=90)
    finally:
        cap.stop()
    assert r["failures"] == [] and r["ok"] == 200, _diagnose(gw, div, r, cap)
    assert r["open_at_once"] == 200
    print(f"\n200 concurrent diverted connections (100 IPv4 + 100 IPv6 addresses): all connected in "
          f"{r['connect_seconds']:.2f}s, all echoed in {r['seconds']:.2f}s = {200 / r['seconds']:.0f} conn/s "
          f"({r['client_ports_shared']} client ports in use twice)")

    want = {(f"[{h}]:{p}" if ":" in h else f"{h}:{p}") for h, p, _ in targets}
    harness.wait_for(lambda: want <= {x["original_destination"] for x in div.log()}, 20,
                 "a log line for each of the 200 conversations",
                 detail=lambda: f"missing: {sorted(want - {x['original_destination'] for x in div.log()})[:10]}")


@pytest.mark.any_backend  # the worker's aliasing; test_e2e_identity's TCP case runs in the VM tier
def test_same_client_port_to_two_destinations(gw):
    """Two conversations from one client address and port (to different
    addresses and ports) are both open at once: each gets its own echo. At
    the listener they would be one 4-tuple; the worker gives the second an
    alias client port."""
    div = gw.ensure()
    sport = gw.fresh_port()
    # Destinations no other test uses, so no TIME_WAIT of theirs is in the way.
    targets = [["198.51.100.221", 32221, "first-conversation"], ["198.51.100.241", 32241, "second-conversation"]]
    r = gw.client_run("fan-out", "tcp", "--json", json.dumps(targets), "--sport", str(sport))
    assert all(x["ok"] for x in r["results"]), r["results"]
    lines = harness.log_barrier(gw.client, div, gw.fresh_port())
    got = sorted(x["original_destination"] for x in lines if x["client"] == f"{harness.CLIENT4}:{sport}")
    assert got == ["198.51.100.221:32221", "198.51.100.241:32241"], lines


@pytest.mark.load
def test_50mb_through_one_diverted_connection_is_byte_exact(gw):
    gw.ensure()
    r = gw.client_run("bulk", "198.51.100.10", "45679", "50", "--timeout", "120", timeout=180)
    assert r["ok"], r
    assert r["bytes_received"] == r["bytes_sent"] == 50 * 1024 * 1024, r
    assert r["sha256_received"] == r["sha256_sent"], r
    print(f"\n50 MB echoed through one diverted connection (gateway, veth): "
          f"{r['seconds']:.2f}s, {r['mb_per_s']:.1f} MB/s each way")


@pytest.mark.load
def test_local_mode_10mb_over_loopback_is_byte_exact(local):
    host, div = local
    r = harness.run_client(host, "bulk", "198.51.100.50", "45678", "10", "--timeout", "60", timeout=120)
    assert r["ok"], r
    assert r["bytes_received"] == r["bytes_sent"] and r["sha256_received"] == r["sha256_sent"], r
    rec = div.wait_log(lambda x: x["original_destination"] == "198.51.100.50:45678")
    assert rec["protocol"] == "tcp" and rec["listener"] == "tcp-echo" and rec["interface"] == "lo", rec
    print(f"\n10 MB echoed in local mode over loopback (MSS clamped): {r['seconds']:.2f}s, "
          f"{r['mb_per_s']:.1f} MB/s each way")


# ---- 7. local mode exemptions -------------------------------------------------------------

@pytest.mark.any_backend  # the skuid rule comes before the queue in both forms; the VM reads it back
def test_local_mode_leaves_users_alone(local):
    host, div = local
    nobody = harness.run_client(host, "tcp", "198.51.100.51", "45678", "as-nobody", "--timeout", "2", user=65534)
    assert not nobody["ok"], f"nobody's connection was answered: {nobody}"
    root = harness.run_client(host, "tcp", "198.51.100.51", "45678", "as-root")
    assert root["ok"] and root["reply"] == "as-root" and root["peer"] == ["198.51.100.51", 45678], root
    lines = harness.log_barrier(host, div, 40001)
    mine = [x for x in lines if x["original_destination"] == "198.51.100.51:45678"]
    # Exactly one conversation to it: root's.
    assert [x["client"].rsplit(":", 1)[1] for x in mine] == [str(root["local"][1])], mine


def test_local_mode_a_loopback_service_is_reached_and_one_on_another_address_is_not(local):
    """In local mode `redirect` goes to 127.0.0.1: a service there is what the
    host's own programs reach; one on the host's other address is not, so
    that port stays diverted."""
    host, div = local
    procs = [harness.serve_tcp(host, 9002, "own-loopback", bind="127.0.0.1"),
             harness.serve_tcp(host, 9003, "own-out0", bind="192.0.2.10")]
    try:
        harness.wait_bound_set(host, "tcp", 9002, address="127.0.0.1")
        harness.wait_bound_set(host, "tcp", 9003, address="192.0.2.10")
        r = harness.run_client(host, "tcp", "198.51.100.52", "9002", "hello")
        assert r["ok"] and r["reply"] == "own-loopback" and r["peer"] == ["198.51.100.52", 9002], r
        r = harness.run_client(host, "tcp", "198.51.100.53", "9003", "echo-9003")
        assert r["ok"] and r["reply"] == "echo-9003" and r["peer"] == ["198.51.100.53", 9003], r
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=5)
