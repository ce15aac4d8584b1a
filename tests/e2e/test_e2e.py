"""End to end, real kernel, real packets: a client routes through a diverter
running `nftdivert run`; an internet host behind it must never see the client.

Lab and client programs: tests/harness.py. The queue backend comes from
NFTDIVERT_TEST_BACKEND (default auto: xt on kernels without the nft queue
statement, nft on stock kernels); every test works with either.
"""

from __future__ import annotations

import json
import re
import subprocess
import shlex
from concurrent.futures import ThreadPoolExecutor

import pytest

import harness
import netns

pytestmark = pytest.mark.kernel

# The module's diverter config; tests that need another start their own.
STD = dict(tcp_ports=[2222], hosts=["198.51.100.200/32"])


@pytest.fixture
def div(gw):
    return gw.ensure(**STD)


# ---- 1. the origin scenario ---------------------------------------------------------

def test_origin_scenario_tcp_answered_from_the_address_asked_for(gw, div, tmp_path):
    gw.assert_origin_scenario(div, tmp_path / "client.pcap")


# ---- 2. the counter-proof: the reply fix-up after conntrack breaks it -----------------

_RESTORE_PRIO = re.compile(r"(chain restore_replies \{\n\s*type filter hook output priority )raw( - 1)?;")


def _move_xt_rule(ns, chain: str, src: str, dst: str) -> None:
    """Move nftdivert's tagged iptables-nft rules (one per queue worker) in `chain` from table `src` to `dst`."""
    for tool in ("iptables-nft", "ip6tables-nft"):
        rules = [line for line in ns.run(f"{tool}-save", "-t", src).stdout.splitlines()
                 if line.startswith(f"-A {chain} ") and "nftdivert:" in line]
        assert rules, f"{tool} -t {src}: no tagged {chain} rule"
        for rule in rules:
            spec = shlex.split(rule)[2:]
            ns.run(tool, "-t", src, "-D", chain, *spec)
            ns.run(tool, "-t", dst, "-A", chain, *spec)


def _restore_replies_prio(ns) -> int:
    chains = [o["chain"] for o in harness.nft_json(ns, "list", "chain", "inet", harness.TABLE, "restore_replies")
              if "chain" in o]
    return chains[0]["prio"]


@pytest.mark.queue_path  # the kernel path rewrites nothing at any priority
def test_counterproof_reply_fixup_at_mangle_priority_breaks_the_connection(gw, div, tmp_path):
    ns = gw.diverter_ns
    backend = harness.active_backend(ns)
    normal_prio = _restore_replies_prio(ns)
    assert normal_prio == {"nft": -300, "xt": -301}[backend]

    text = harness.nftdivert(ns, "render", "-c", str(div.config_path), "--backend", backend).stdout
    moved, n = _RESTORE_PRIO.subn(lambda m: m[1] + "mangle" + (m[2] or "") + ";", text)
    assert n == 1, "restore_replies chain header not found in the rendered ruleset"
    (tmp_path / "mangle.nft").write_text(moved)
    try:
        ns.run("nft", "-f", str(tmp_path / "mangle.nft"))
        if backend == "xt":
            _move_xt_rule(ns, "OUTPUT", "raw", "mangle")
        assert _restore_replies_prio(ns) == normal_prio + 150  # mangle (-150) or mangle - 1

        nc, packets = gw.origin_scenario(tmp_path / "broken.pcap")
        shown = "\n".join(packets)
        assert not (nc.returncode == 0 and nc.stdout == "fdsa\n"), f"it worked at mangle priority?\n{shown}"
        parsed = [p for p in map(harness.parse_tcp, packets) if p]
        wrong_synack = [p for p in parsed if p["flags"] == "S." and p["src"] != ("198.51.100.7", 45678)]
        client_rst = [p for p in parsed if p["src"][0] == harness.CLIENT4 and "R" in p["flags"]]
        assert wrong_synack or client_rst, f"neither a misaddressed SYN/ACK nor a client RST:\n{shown}"
        print(f"\ncounter-proof ({backend}): nc exit {nc.returncode}; "
              f"{len(wrong_synack)} SYN/ACK from {sorted({p['src'] for p in wrong_synack})}, "
              f"{len(client_rst)} RST from the client")
    finally:
        harness.nftdivert(ns, "apply", "-c", str(div.config_path))

    assert _restore_replies_prio(ns) == normal_prio
    if backend == "xt":
        tagged = [line for line in harness.xt_save(ns).splitlines() if "nftdivert:" in line]
        assert len(tagged) == 4 * harness.WORKERS, tagged  # mangle INPUT + raw OUTPUT, per family and worker
    assert div.alive()
    gw.assert_origin_scenario(div, tmp_path / "restored.pcap")


# ---- 3. UDP, IPv6, ICMP ------------------------------------------------------------

def test_udp_round_trip_answered_from_the_address_asked_for(gw, div):
    r = gw.udp("198.51.100.23", 5353, "udp-hello-5353")
    assert r["ok"], r
    assert r["reply"] == "udp-hello-5353" and r["source"] == ["198.51.100.23", 5353], r
    client = f"{harness.CLIENT4}:{r['local'][1]}"
    rec = div.wait_log(lambda x: x["client"] == client and x["event"] == "start")
    assert rec["protocol"] == "udp" and rec["original_destination"] == "198.51.100.23:5353", rec
    assert rec["listener"] == "udp-echo" and rec["interface"] == harness.DIV_CLIENT_IF, rec
    # conntrack forgets it now (not in 30 s): its DESTROY event is the end record, with conntrack's counters.
    gw.diverter_ns.run("conntrack", "-D", "-p", "udp", "--orig-dst", "198.51.100.23", "--orig-port-dst", "5353")
    end = div.wait_log(lambda x: x["client"] == client and x["event"] == "end", what="the end record")
    payload = 20 + 8 + len("udp-hello-5353")  # IP bytes, as conntrack counts them
    assert (end["id"], end["sent"], end["received"]) == (rec["id"], {"packets": 1, "bytes": payload},
                                                          {"packets": 1, "bytes": payload}), end


def test_ipv6_tcp_round_trip(gw, div):
    r = gw.tcp("2001:db8:ffff::7", 45678, "tcp6-hello")
    assert r["ok"] and r["reply"] == "tcp6-hello", r
    assert r["peer"] == ["2001:db8:ffff::7", 45678], r
    rec = div.wait_log(lambda x: x["client"] == f"[{harness.CLIENT6}]:{r['local'][1]}")
    assert rec["protocol"] == "tcp" and rec["original_destination"] == "[2001:db8:ffff::7]:45678", rec


def test_ipv6_udp_round_trip(gw, div):
    r = gw.udp("2001:db8:ffff::7", 45678, "udp6-hello")
    assert r["ok"], r
    assert r["reply"] == "udp6-hello" and r["source"] == ["2001:db8:ffff::7", 45678], r
    rec = div.wait_log(lambda x: x["client"] == f"[{harness.CLIENT6}]:{r['local'][1]}")
    assert rec["protocol"] == "udp" and rec["original_destination"] == "[2001:db8:ffff::7]:45678", rec


@pytest.mark.any_backend  # echo requests are answered by redirect alone: no queue
@pytest.mark.parametrize("addr", ["198.51.100.99", "2001:db8:ffff::99"])
def test_icmp_echo_answered(gw, div, addr):
    proc = gw.client.run("ping", "-c1", "-W2", addr, check=False, timeout=15)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"from {addr}" in proc.stdout, proc.stdout


# ---- 4. a bound port reaches its own socket ------------------------------------------

def test_bound_port_reaches_its_own_listener_untouched_and_is_logged(gw, div):
    server = harness.serve_tcp(gw.diverter_ns, 8080, "own-8080")
    try:
        harness.wait_bound_set(gw.diverter_ns, "tcp", 8080)
        r = gw.tcp("198.51.100.8", 8080, "not-an-echo")
        assert r["ok"] and r["reply"] == "own-8080", r
        assert r["peer"] == ["198.51.100.8", 8080], r
        lines = gw.log_barrier(div)
        mine = [x for x in lines if x["original_destination"] == "198.51.100.8:8080"]
        # Logged like any other conversation: exactly one start, naming the host's own service.
        assert len(mine) == 1 and mine[0]["client"] == f"{harness.CLIENT4}:{r['local'][1]}", lines
        assert (mine[0]["listener"], mine[0]["listener_port"]) == ("host", 8080), mine
    finally:
        server.kill()
        server.wait(timeout=5)


# A service binds and a client asks for its port a moment later: whoever
# answered, the record names it. The ruleset's bound sets and the log's own
# view of the host's sockets are refreshed apart, so the log must take the
# answer from the kernel (the reply tuple, the queued mark), not its own view.
# Delays from 0 to 0.55 s: before and after either refresh.
@pytest.mark.any_backend  # the labels come from conntrack, the same on both backends
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_service_bound_a_moment_ago_is_named_only_when_it_answered(gw, div, proto):
    ports = [gw.fresh_port() for _ in range(48)]
    _assert_named_as_answered(gw.client, gw.diverter_ns, div, proto, ports, gw.fresh_port(), harness.DIV_CLIENT4)


# The same in local mode, where the queue path's NEW event comes before the
# packet is queued (the entry is confirmed on its way out, to lo).
@pytest.mark.any_backend
def test_in_local_mode_too_a_service_bound_a_moment_ago_is_named_only_when_it_answered(tmp_path):
    with harness.local_lab(netns, tmp_path) as (host, div):
        _assert_named_as_answered(host, host, div, "tcp", list(range(20000, 20048)), 30000, "127.0.0.1")


def _assert_named_as_answered(client, server, div, proto: str, ports: list[int], barrier: int, own: str) -> None:
    """Bind a service on each port in `server`, on every address or on `own` (the
    address the redirect gives: only the ruleset's sets know it, on the kernel
    path too), and ask for it from `client` a moment later (0 to 0.55 s: before
    and after either refresh): the record names whoever answered."""
    delays = [(i % 12) * 0.05 for i in range(len(ports))]
    binds = [own if i % 24 >= 12 else "::" for i in range(len(ports))]
    out = harness.run_client(client, "bind-race", proto, server.name, "198.51.100.9", "--json",
                         json.dumps({"ports": ports, "delays": delays, "binds": binds}), timeout=120)
    assert out["ok"], [r for r in out["rounds"] if not r["ok"]]
    starts = {r["original_destination"]: r for r in harness.log_barrier(client, div, barrier)}
    wrong = []
    for r in out["rounds"]:
        rec = starts.get(f"198.51.100.9:{r['port']}")
        answered = ("host", r["port"]) if r["reply"] == f"own-{r['port']}" else (f"{proto}-echo", harness.LISTENER_PORT)
        if rec is None or (rec["listener"], rec.get("listener_port")) != answered:
            wrong.append((r, rec))
    own = sum(r["reply"].startswith("own-") for r in out["rounds"])
    print(f"\n{proto}: {own} of {len(ports)} answered by the new service")
    assert not wrong, f"{len(wrong)} of {len(ports)} records name another listener: {wrong[:5]}"


@pytest.mark.any_backend  # the queue backend queues these like any other; the kernel path NATs the port only
def test_the_gateways_own_address_on_an_unbound_port_is_answered_from_it(gw, div):
    port = gw.fresh_port()
    for host in (harness.DIV_CLIENT4, harness.DIV_CLIENT6):
        t = gw.tcp(host, port, f"own-address-{host}")
        assert t["ok"] and t["reply"] == f"own-address-{host}" and t["peer"] == [host, port], t
        u = gw.udp(host, port, f"own-address-{host}")
        assert u["ok"] and u["reply"] == f"own-address-{host}" and u["source"] == [host, port], u


# A service that binds while the diverter runs: its own new conversations
# within a second (the sets follow the host's sockets every 0.25 s on the
# kernel path, 0.5 s on the queue path; on the kernel path the socket
# expression finds a socket bound to every address at once), while a
# conversation the default listener already answers stays with it.
@pytest.mark.any_backend  # the bound sets, not the queue: in the VM, the kernel path runs it
@pytest.mark.parametrize("bind", ["::", harness.DIV_CLIENT4], ids=["every-address", "the-gateway-address"])
def test_a_service_that_binds_while_running_gets_its_new_conversations_within_a_second(gw, div, bind):
    port = gw.fresh_port()
    argv, env = harness._client("hold", "198.51.100.61", str(port))
    held = gw.client.popen(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    server = None
    try:
        assert json.loads(held.stdout.readline())["ok"]
        held.stdin.write("before\n")
        held.stdin.flush()
        assert json.loads(held.stdout.readline())["reply"] == "before"  # the default listener's echo
        server = harness.serve_tcp(gw.diverter_ns, port, f"own-{port}", bind=bind)
        r = gw.client_run("until-reply", "198.51.100.62", str(port), f"own-{port}", "--timeout", "10")
        print(f"\nbound {bind}:{port}: its own after {r['seconds']:.2f} s ({r['attempts']} attempts)")
        assert r["ok"] and r["seconds"] < 1.0, r
        held.stdin.write("after\n")
        held.stdin.flush()
        assert json.loads(held.stdout.readline())["reply"] == "after"  # still the echo, not own-PORT
    finally:
        held.stdin.close()
        held.wait(timeout=10)
        if server is not None:
            server.kill()
            server.wait(timeout=5)


# ---- 5. left alone ------------------------------------------------------------------

def test_left_alone_ports_and_hosts_are_not_answered_and_do_not_leak(gw, div):
    targets = [("198.51.100.9", 2222), ("198.51.100.200", 45678)]
    with ThreadPoolExecutor(len(targets)) as pool:
        results = list(pool.map(lambda t: gw.tcp(t[0], t[1], "leave-me", timeout=2), targets))
    for (host, port), r in zip(targets, results):
        assert not r["ok"], f"{host}:{port} was answered: {r}"
        assert "timed out" in r["error"], f"{host}:{port}: {r}"
    lines = gw.log_barrier(div)
    assert not [x for x in lines if x["original_destination"] in ("198.51.100.9:2222", "198.51.100.200:45678")]
    gw.assert_no_leaks()


# ---- 9. status ----------------------------------------------------------------------

def test_status_shows_table_backend_and_worker_counters(gw, div):
    r = gw.udp("198.51.100.24", 4242, "status-traffic")
    assert r["ok"], r
    backend = harness.active_backend(gw.diverter_ns)
    if harness.BACKEND != "auto" and not harness.KERNEL_PATH:
        assert backend == harness.BACKEND
    # What the run publishes: the worker's packet counters, or the kernel path's redirects.
    counted = r"kernel path: new conversations .* udp (\d+)" if harness.KERNEL_PATH else r"packets seen (\d+)"

    def worker_line(out=None):
        out = out or harness.nftdivert(gw.diverter_ns, "status").stdout
        m = re.search(r"worker: pid (\d+): " + counted, out)
        return (out, m) if m and int(m[2]) > 0 else None

    out = harness.nftdivert(gw.diverter_ns, "status").stdout
    if harness.KERNEL_PATH:
        assert f"table inet {harness.TABLE}: loaded, kernel path (nothing queued)" in out, out
        chains = ("answer_for_all", "redirect_from_clients", "contain")
    else:
        assert f"table inet {harness.TABLE}: loaded, queue backend {backend}" in out, out
        chains = ("divert_incoming", "restore_replies", "contain")
    for chain in chains:
        assert chain in out, out
    if "worker: none running" in out and not harness.stats_writable():
        pytest.skip("/run is not writable here: the worker cannot publish its counters")
    # The counters are published each second: usually there already.
    out, m = worker_line(out) or harness.wait_for(worker_line, 10, "the worker's counters in `nftdivert status`",
                                              detail=lambda: harness.nftdivert(gw.diverter_ns, "status").stdout)
    assert int(m[1]) == div.proc.pid, out
    if not harness.KERNEL_PATH:
        assert "new-conversation hook errors 0" in out, out
    assert "log lines " in out and "(dropped 0, failed 0)" in out, out
    print(f"\nstatus: {out.splitlines()[-1].strip()}")


@pytest.mark.any_backend  # the sets `run` fills (bound ports, the kernel path's serving set) are not drift
def test_diff_finds_no_drift_while_it_runs(gw, div):
    gw.tcp("198.51.100.25", 4343, "some-traffic")
    proc = harness.nftdivert(gw.diverter_ns, "diff", "-c", str(div.config_path), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
