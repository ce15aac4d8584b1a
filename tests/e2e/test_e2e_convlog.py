"""The conversation log end to end: one start and one end record per conversation.

A gateway lab runs `nftdivert run` with the default echo listeners, a DNS
listener and an external program on a bound port (TCP and UDP 8443). Real
clients talk to each (TCP, UDP, `dig @192.0.2.53`, `dig @2001:db8::53`,
ICMP and ICMPv6 echo); then the diverter stops, and the log and the summary
are read back. The records come from conntrack events, not from the queue:
the queue backend plays no part in what is proved here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import harness
import netns
from conftest import REPO, nftdivert_argv
from nftdivert.observers import summary as summary_mod

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

EXT_PORT = 8443
RESOLVER4, RESOLVER6 = "192.0.2.53", "2001:db8::53"
DIG = ("dig", "+tries=1", "+time=5", "+short")
UDP_PAYLOAD, TCP_PAYLOAD = "conv-udp", "conv-tcp-payload"
EXT_UDP_REPLY = "ext-udp-reply"
CURL = ("curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{local_port}")


def config(extra: str = "") -> str:
    listeners = [("tcp-echo", "tcp", 1337, "echo"), ("udp-echo", "udp", 1337, "echo"),
                 ("dns", "udp", 53, "dns"), ("dns-tcp", "tcp", 53, "dns"),
                 ("ext-tcp", "tcp", EXT_PORT, "external"), ("ext-udp", "udp", EXT_PORT, "external")]
    return "\n".join([
        'mode = "gateway"', 'containment_after_stop = "remove"', harness.DIVERT_PATH_LINE,
        "[queue]", f'backend = "{harness.BACKEND}"', "",
        *(f'[[listeners]]\nname = "{n}"\nprotocol = "{p}"\nport = {port}\nkind = "{k}"\n'
          for n, p, port, k in listeners), extra])


@pytest.fixture(scope="module")
def observed(gw):
    """Run every client once, stop the diverter; returns what the clients and the diverter said."""
    gw.stop()
    ns, client = gw.diverter_ns, gw.client
    # 192.0.2.53 is on the client's own link: a host route sends it to the gateway as a resolver would be.
    client.run("ip", "route", "add", f"{RESOLVER4}/32", "via", harness.DIV_CLIENT4)
    servers = [harness.serve_tcp(ns, EXT_PORT, "ext-tcp-reply"), harness.serve_udp(ns, EXT_PORT, EXT_UDP_REPLY)]
    summary = gw.workdir / "summary.json"
    div = harness.Diverter(ns, gw.workdir, config(), name="convlog", args=("--summary", str(summary))).start()
    try:
        harness.wait_bound_set(ns, "tcp", EXT_PORT)
        harness.wait_bound_set(ns, "udp", EXT_PORT)
        got = {
            "tcp": gw.tcp("198.51.100.31", 45678, TCP_PAYLOAD),
            "udp": gw.udp("198.51.100.32", 5000, UDP_PAYLOAD),
            "ext_tcp": gw.tcp("198.51.100.33", EXT_PORT, "ext"),
            "ext_udp": gw.udp("198.51.100.34", EXT_PORT, "ext"),
            "dig4": client.run(*DIG, f"@{RESOLVER4}", "c2.example", "A", timeout=30).stdout.strip(),
            "dig6": client.run(*DIG, f"@{RESOLVER6}", "c2v6.example", "AAAA", timeout=30).stdout.strip(),
            "dig4_tcp": client.run(*DIG, "+tcp", f"@{RESOLVER4}", "tcp.example", "A", timeout=30).stdout.strip(),
            "ping4": client.run("ping", "-c1", "-W5", "198.51.100.35", check=False, timeout=15),
            "ping6": client.run("ping", "-6", "-c1", "-W5", "2001:db8:ffff::35", check=False, timeout=15),
        }
        got["named"] = gw.tcp(got["dig4"], 4444, "to-a-name")
        got["http"] = client.run(*CURL, "http://198.51.100.36/", timeout=30).stdout
        # conntrack forgets a conversation by hand: its DESTROY event ends it while the diverter runs.
        ns.run("conntrack", "-D", "-p", "udp", "--orig-dst", "198.51.100.34", check=False)
        got["destroyed_early"] = div.wait_log(
            lambda r: r.get("event") == "end" and r["original_destination"] == f"198.51.100.34:{EXT_PORT}",
            what="the end record of a conversation conntrack forgot")
        time.sleep(0.5)
        div.stop_and_check()
    finally:
        div.kill()
        for server in servers:
            server.kill()
            server.wait(timeout=5)
        client.run("ip", "route", "del", f"{RESOLVER4}/32", check=False)
    got.update(records=div.log(), stderr=div.stderr(), summary=json.loads(summary.read_text()))
    return got


def _conversation(records: list[dict], protocol: str, destination: str) -> tuple[dict, dict]:
    """The one start and the one end record of the conversation to `destination`."""
    mine = [r for r in records if r.get("protocol") == protocol and r.get("original_destination") == destination]
    starts = [r for r in mine if r["event"] == "start"]
    ends = [r for r in mine if r["event"] == "end"]
    assert len(starts) == 1 and len(ends) == 1, mine
    start, end = starts[0], ends[0]
    assert start["id"] == end["id"] and start["v"] == end["v"] == 1, (start, end)
    assert start["client"] == end["client"], (start, end)
    assert end["duration"] is not None and 0 <= end["duration"] < 120, end
    return start, end


def _udp_bytes(payload: str) -> int:
    return 20 + 8 + len(payload)  # IPv4 header, UDP header, payload: conntrack counts IP bytes


def test_tcp_and_udp_to_the_default_listeners(observed):
    tcp, udp = observed["tcp"], observed["udp"]
    assert tcp["ok"] and udp["ok"], (tcp, udp)
    start, end = _conversation(observed["records"], "tcp", "198.51.100.31:45678")
    assert start["client"] == f"{harness.CLIENT4}:{tcp['local'][1]}", start
    assert (start["listener"], start["listener_port"], start["interface"]) == ("tcp-echo", 1337, harness.DIV_CLIENT_IF)
    assert end["ended"] == "closed", end
    for way in ("sent", "received"):  # the payload, echoed, plus at least a bare header per packet
        assert end[way]["packets"] >= 3 and end[way]["bytes"] >= 40 * end[way]["packets"] + len(TCP_PAYLOAD), end
    start, end = _conversation(observed["records"], "udp", "198.51.100.32:5000")
    assert start["client"] == f"{harness.CLIENT4}:{udp['local'][1]}" and start["listener"] == "udp-echo", start
    assert end["sent"] == end["received"] == {"packets": 1, "bytes": _udp_bytes(UDP_PAYLOAD)}, end
    assert end["ended"] in ("open", "timeout"), end


def test_an_external_listener_on_a_bound_port(observed):
    assert observed["ext_tcp"]["reply"] == "ext-tcp-reply", observed["ext_tcp"]
    start, end = _conversation(observed["records"], "tcp", f"198.51.100.33:{EXT_PORT}")
    assert (start["listener"], start["listener_port"]) == ("ext-tcp", EXT_PORT), start
    assert end["ended"] == "closed", end
    start, end = _conversation(observed["records"], "udp", f"198.51.100.34:{EXT_PORT}")
    assert (start["listener"], start["listener_port"]) == ("ext-udp", EXT_PORT), start
    # Ended by its DESTROY event while the diverter ran, not by the dump at stop.
    assert end == observed["destroyed_early"] and end["ended"] == "timeout", end
    assert end["sent"] == {"packets": 1, "bytes": _udp_bytes("ext")}, end
    assert end["received"] == {"packets": 1, "bytes": _udp_bytes(EXT_UDP_REPLY)}, end


@pytest.mark.parametrize("protocol, resolver, key", [("udp", f"{RESOLVER4}:53", "dig4"),
                                                     ("udp", f"[{RESOLVER6}]:53", "dig6"),
                                                     ("tcp", f"{RESOLVER4}:53", "dig4_tcp")])
def test_the_dns_listener_with_the_resolver_the_client_asked(observed, protocol, resolver, key):
    assert observed[key].startswith(("198.18.", "2001:db8:53:")), observed[key]  # a pool address: it answered
    start, end = _conversation(observed["records"], protocol, resolver)
    assert start["listener"] == ("dns" if protocol == "udp" else "dns-tcp") and start["listener_port"] == 53, start
    assert end["sent"]["packets"] >= 1 and end["received"]["packets"] >= 1, end


def test_a_conversation_is_named_by_the_dns_answer_of_its_address(observed):
    assert observed["named"]["ok"], observed["named"]
    start, end = _conversation(observed["records"], "tcp", f"{observed['dig4']}:4444")
    assert start["name"] == end["name"] == "c2.example", (start, end)


@pytest.mark.parametrize("key, protocol, address, size", [("ping4", "icmp", "198.51.100.35", 84),
                                                          ("ping6", "icmpv6", "2001:db8:ffff::35", 104)])
def test_icmp_echo(observed, key, protocol, address, size):
    assert observed[key].returncode == 0, observed[key].stdout
    start, end = _conversation(observed["records"], protocol, address)
    assert start["icmp"]["type"] == (8 if protocol == "icmp" else 128) and start["icmp"]["code"] == 0, start
    assert start["listener"] == "kernel" and "listener_port" not in start, start
    # ping's default: 56 bytes of data, plus the ICMP header and the IP header.
    assert end["sent"] == end["received"] == {"packets": 1, "bytes": size}, end


def test_the_summary_at_exit(observed):
    groups = {g["client_address"]: g for g in observed["summary"]["groups"]}
    assert set(groups) == {harness.CLIENT4, harness.CLIENT6}, groups.keys()  # its IPv4 and its IPv6 address
    rows = {(r["address"], r["port"], r["protocol"]): r for r in groups[harness.CLIENT4]["contacted"]}
    tcp = rows["198.51.100.31", 45678, "tcp"]
    assert tcp["conversations"] == 1 and tcp["bytes_sent"] > len(TCP_PAYLOAD) and tcp["name"] is None, tcp
    named = rows[observed["dig4"], 4444, "tcp"]
    assert named["name"] == "c2.example", named
    assert rows["198.51.100.35", None, "icmp"]["bytes_received"] == 84
    six = {(r["address"], r["protocol"]) for r in groups[harness.CLIENT6]["contacted"]}
    assert six == {("2001:db8:ffff::35", "icmpv6"), (RESOLVER6, "udp")}, six
    starts = [r for r in observed["records"] if r["event"] == "start"]
    assert observed["summary"]["total"]["conversations"] == len(starts) == sum(g["conversations"]
                                                                                for g in groups.values())
    err = observed["stderr"]
    table = err[err.index("contacted:"):].splitlines()
    assert table[1].split()[:2] == ["client", "name"], table
    assert any(line.split()[:2] == [harness.CLIENT4, "c2.example"] for line in table), table
    assert any(line.split()[0] == harness.CLIENT6 for line in table[2:]), table
    assert next(line for line in table if line.split()[0] == "total").split()[1] == str(len(starts)), table


def test_every_record_with_a_client_names_its_address_without_the_port(observed):
    assert observed["http"].isdigit(), observed["http"]
    records = [r for r in observed["records"] if "client" in r]
    assert {"start", "end", "dns", "http"} <= {r["event"] for r in records}, records
    for r in records:
        bare = r["client"] if r.get("protocol", "").startswith("icmp") else r["client"].rsplit(":", 1)[0]
        assert r["client_address"] == bare.strip("[]") and r["client_address"] in (harness.CLIENT4, harness.CLIENT6), r


# ---- the text log -------------------------------------------------------------------

SECOND_CLIENT = "192.0.2.3"  # a second address of the client's: a second client in the summary
SCANNED = 300  # UDP conversations still open at the stop: their end records come from the dump then


def _lines_of(lines: list[str], client: str) -> list[tuple[int, str]]:
    """(index, event) of the log lines about one client address and port."""
    return [(i, line.split()[1]) for i, line in enumerate(lines)
            if len(line.split()) > 3 and client in line.split()[2:4]]


def _observer_of(run_pid: int) -> int:
    """The run's observer process: its child at nice 19."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == run_pid and int(fields[16]) == 19:
            return int(stat.parent.name)
    raise AssertionError(f"no observer process under {run_pid}")


def test_the_text_log_writes_each_start_first_and_every_end_before_the_table(gw, tmp_path):
    gw.stop()
    ns, client = gw.diverter_ns, gw.client
    cfg, out, summary = tmp_path / "text.toml", tmp_path / "out.txt", tmp_path / "summary.json"
    cfg.write_text(config(f'[tls]\nstate_dir = "{tmp_path / "tls"}"\n'))
    client.run("ip", "addr", "add", f"{SECOND_CLIENT}/24", "dev", "eth0")
    with open(out, "w") as both:  # the log (stdout) and the table (stderr) in the order they were written
        proc = ns.popen(*harness.nftdivert_argv("run", "-c", str(cfg), "--log", "-", "--log-format", "text",
                                            "--summary", str(summary)),
                        stdout=both, stderr=subprocess.STDOUT, env=harness._env())
    ports = {}
    try:
        harness.wait_for(lambda: proc.poll() is not None or "applied;" in out.read_text(), 60, "the run to start")
        assert proc.poll() is None, out.read_text()
        observer = _observer_of(proc.pid)
        # Its lag comes from SIGSTOP below, and only from there: at nice 0 it catches up at once
        # after SIGCONT, well within the time a listener's record waits for its start.
        for task in Path(f"/proc/{observer}/task").iterdir():  # nice is per thread
            os.setpriority(os.PRIO_PROCESS, int(task.name), 0)
        for key, source, url in (("http", (), "http://198.51.100.41/"), ("https", ("-k",), "https://198.51.100.42/"),
                                 ("second", ("--interface", SECOND_CLIENT), "http://198.51.100.43/")):
            # The observer lags (it runs at nice 19: under load it gets the CPU last): its
            # start record comes after the listener's records.
            os.kill(observer, signal.SIGSTOP)
            try:
                ports[key] = client.run(*CURL, *source, url, timeout=30).stdout
            finally:
                os.kill(observer, signal.SIGCONT)
            address = SECOND_CLIENT if key == "second" else harness.CLIENT4
            harness.wait_for(lambda: f" {address}:{ports[key]} -> " in out.read_text(), 30, f"the start of {key}")
        harness.run_client(client, "udpscan", "198.51.100.44", str(SCANNED), timeout=60)
        # Stopped only once every datagram has become a conversation: the queue may still hold some.
        harness.wait_for(lambda: sum(line[14:].startswith("start ") for line in out.read_text().splitlines())
                     >= SCANNED + 3, 60, "every conversation's start")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.run("ip", "addr", "del", f"{SECOND_CLIENT}/24", "dev", "eth0", check=False)
    text = out.read_text()
    assert rc == 0 and "Traceback" not in text, text
    harness.assert_clean(ns)
    lines = text.splitlines()
    table = lines.index("contacted:")
    want = {"http": ["start", "http", "end"], "https": ["start", "tls", "http", "end"],
            "second": ["start", "http", "end"]}
    for key, address in (("http", harness.CLIENT4), ("https", harness.CLIENT4), ("second", SECOND_CLIENT)):
        assert ports[key].isdigit(), ports
        mine = _lines_of(lines, f"{address}:{ports[key]}")
        assert [event for _i, event in mine] == want[key], "\n".join(lines[i] for i, _e in mine) or text
    ends = [i for i, line in enumerate(lines) if line[14:].startswith("end ")]
    starts = [line for line in lines if line[14:].startswith("start ")]
    assert len(ends) == len(starts) == SCANNED + 3 and max(ends) < table, text[-3000:]
    rows = [line.split() for line in lines[table + 2:] if line.startswith("  ")]
    mine = [r for r in rows if r[0] == harness.CLIENT4]
    assert [r[2] for r in mine[:2]] == ["198.51.100.42", "198.51.100.41"], rows  # the most bytes first
    more = SCANNED + 2 - summary_mod.ROWS_SHOWN
    assert len(mine) == summary_mod.ROWS_SHOWN + 1 and mine[-1][1:5] == [f"({more}", "more", "destinations)",
                                                                        str(more)], mine[-1]
    assert [r[2] for r in rows if r[0] == SECOND_CLIENT] == ["198.51.100.43"], rows
    assert rows[-1][:2] == ["total", str(SCANNED + 3)], rows
    groups = {g["client_address"]: g for g in json.loads(summary.read_text())["groups"]}
    assert groups[harness.CLIENT4]["conversations"] == SCANNED + 2, groups[harness.CLIENT4]
    assert groups[SECOND_CLIENT]["conversations"] == 1, groups


# ---- which process: local mode and the sandbox ---------------------------------------

def _start_of(records: list[dict], destination: str) -> dict:
    starts = [r for r in records if r.get("event") == "start" and r["original_destination"] == destination]
    assert len(starts) == 1, records
    return starts[0]


def test_local_mode_names_the_process_that_connected(tmp_path):
    with harness.local_lab(netns, tmp_path) as (host, div):
        # `ip netns exec` execs: nc keeps the pid Popen knows. It stays connected until its
        # stdin closes, after the test has seen the start record.
        nc = host.popen("nc", "-q1", "-w10", "198.51.100.60", "45678", stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            div.wait_log(lambda r: r.get("event") == "start" and r["original_destination"] == "198.51.100.60:45678",
                         timeout=30)
        finally:
            nc.stdin.close()
            nc.wait(timeout=15)
        start = _start_of(div.log(), "198.51.100.60:45678")
    assert start["interface"] == "lo" and start["listener"] == "tcp-echo", start
    assert start["process"] == {"pid": nc.pid, "host_pid": nc.pid, "command": "nc -q1 -w10 198.51.100.60 45678",
                                "uid": 0}, start


def test_the_sandbox_names_the_process_by_the_pid_it_has_inside(tmp_path):
    pidfile, log, gate = tmp_path / "pid", tmp_path / "log.jsonl", tmp_path / "gate"
    os.mkfifo(gate)  # nc's stdin: it stays connected until the test has seen its start record
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID")}  # CMD runs as root
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(nftdivert_argv("sandbox", "--log", str(log), "--log-format", "json", "--", "sh", "-c",
                                           f"echo $$ > {pidfile}; exec nc -q1 -w10 198.51.100.61 45678 <{gate}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        with open(gate, "w"):
            harness.wait_for(lambda: log.exists() and "198.51.100.61:45678" in log.read_text(), 60,
                         "the start record of nc's conversation")
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in log.read_text().splitlines()]
    start = _start_of(records, "198.51.100.61:45678")
    process = start["process"]
    assert process["pid"] == int(pidfile.read_text()) and process["pid"] != process["host_pid"], start
    assert process["command"] == "nc -q1 -w10 198.51.100.61 45678" and process["uid"] == 0, start
    assert len([r for r in records if r.get("event") == "end" and r["id"] == start["id"]]) == 1, records
