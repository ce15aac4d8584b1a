"""`nftdivert run` on one host in local mode: the pcap it writes, bad paths.

(The gateway scenarios live in the test_e2e modules.)
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter

import pytest

import harness
import netns
import procs
from conftest import nftdivert_argv

pytestmark = pytest.mark.kernel


@pytest.fixture
def host():
    h = harness.build_local_host(netns)
    try:
        yield h
    finally:
        h.delete()


def _local_config(tmp_path):
    cfg = tmp_path / "local.toml"
    cfg.write_text(harness.config_text(mode="local"))
    return cfg


def start(host, tmp_path, *args):
    cfg = _local_config(tmp_path)
    proc = host.popen(*nftdivert_argv("run", "-c", str(cfg), "--log", str(tmp_path / "log.jsonl"), *args),
                      env=harness._env(), text=True)
    harness.wait_for(lambda: harness.table_handle(host) is not None and harness.port_bound(host, "tcp", 1337), 30,
                 "nftdivert run to come up", detail=lambda: proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_the_rewritten_pcap_holds_each_diverted_packet_as_it_arrived_and_as_rewritten(host, tmp_path):
    pcap = tmp_path / "divert.pcap"
    proc = start(host, tmp_path, "--write-rewritten", str(pcap))
    reply = harness.run_client(host, "tcp", "198.51.100.60", "45678", "captured")
    assert reply["ok"] and reply["reply"] == "captured", reply
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    # The client's SYN as it arrived (after NAT, port 45678), then rewritten to the listener;
    # the listener's SYN/ACK from 1337, then restored to 45678.
    arrived = [line for line in lines if ".45678: Flags [S]," in line]
    rewritten = [line for line in lines if ".1337: Flags [S]," in line]
    restored = [line for line in lines if ".45678 > " in line and "Flags [S.]" in line]
    assert arrived and rewritten and restored, "\n".join(lines)
    assert len(lines) % 2 == 0  # every rewritten packet is there twice


def _tshark(pcap, *fields: str) -> list[tuple[str, ...]]:
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", *(a for f in fields for a in ("-e", f))],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [tuple(line.split("\t")) for line in out.splitlines()]


def test_the_pcap_holds_what_local_programs_sent_and_got_once_with_original_destinations(host, tmp_path):
    pcap = tmp_path / "local.pcap"
    proc = start(host, tmp_path, "-w", str(pcap))
    assert harness.run_client(host, "tcp", "198.51.100.60", "45678", "tcp")["reply"] == "tcp"
    assert harness.run_client(host, "udp", "198.51.100.61", "5353", "udp")["reply"] == "udp"
    host.run("ping", "-c1", "-W5", "198.51.100.62", timeout=20)
    host.run("ping", "-6", "-c1", "-W5", "2001:db8:ffff::62", timeout=20)
    host.run("ping", "-c1", "-W5", "127.0.0.1", timeout=20)  # the host's own: not a diverted conversation
    bulk = harness.run_client(host, "bulk", "198.51.100.63", "45679", "2", timeout=60)  # large segments too
    assert bulk["ok"], bulk
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = _tshark(pcap, "ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "tcp.srcport", "tcp.dstport",
                   "udp.srcport", "udp.dstport", "tcp.seq_raw", "tcp.ack_raw", "tcp.flags", "icmp.type", "icmpv6.type",
                   "ip.id", "tcp.window_size_value", "tcp.len")
    assert len(set(rows)) == len(rows), "a packet is in the pcap twice:\n" + "\n".join(map(str, rows))
    far = Counter()
    host_addresses = ("192.0.2.10", "2001:db8:1::10")  # the source the route gave the programs
    for addrs in rows:
        src, dst = addrs[0] or addrs[1], addrs[2] or addrs[3]
        sport, dport = addrs[4] or addrs[6], addrs[5] or addrs[7]
        assert (src in host_addresses) != (dst in host_addresses), addrs
        far[(dst, dport) if src in host_addresses else (src, sport)] += 1
    # Each conversation asked and answered, from where the program thought it went; nothing else.
    assert set(far) == {("198.51.100.60", "45678"), ("198.51.100.61", "5353"), ("198.51.100.62", ""),
                        ("2001:db8:ffff::62", ""), ("198.51.100.63", "45679")}, far
    # Every byte of the bulk transfer, both ways, whole: no packet lost or cut short
    # (a retransmission under load covers bytes already there, so count what is covered).
    covered = 0
    for sport in ("45679", None):
        spans = sorted((int(seq), int(seq) + int(n)) for n, src, dst, seq in
                       _tshark(pcap, "tcp.len", "tcp.srcport", "tcp.dstport", "tcp.seq_raw")
                       if "45679" in (src, dst) and (src == "45679") == (sport is not None) and int(n))
        end = 0
        for first, last in spans:
            covered += max(0, last - max(first, end))
            end = max(end, last)
    assert covered == 2 * 2 * 1024 * 1024
    assert far[("198.51.100.60", "45678")] >= 8 and far[("198.51.100.61", "5353")] == 2, far
    assert f"capture {pcap}: {len(rows)} packets, 0 overruns" in err, err


def test_a_capture_group_another_program_reads_is_refused_and_nothing_is_applied(host, tmp_path):
    other = host.popen("tcpdump", "-i", "nflog:1337", "-w", "/dev/null", text=True)  # another program
    try:
        harness.wait_for(lambda: "listening on" in (other.stderr.readline() or "x listening on"), 20, "the other tcpdump")
        assert other.poll() is None
        proc = harness.nftdivert(host, "run", "--log", "", "-w", str(tmp_path / "x.pcap"), check=False)
    finally:
        other.kill()
        other.wait(timeout=10)
    assert proc.returncode == 1, proc.stderr
    assert "nflog group 1337 is read by another program in this network namespace: set worker.pcap_group" \
        in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert host.run("nft", "list", "ruleset").stdout == ""
    assert harness.queue_bindings(host) == []


def test_sigkill_of_run_stops_its_capture_and_the_pcap_is_readable(host, tmp_path):
    pcap = tmp_path / "killed.pcap"
    proc = start(host, tmp_path, "-w", str(pcap))
    assert harness.run_client(host, "tcp", "198.51.100.60", "45678", "tcp")["reply"] == "tcp"
    children = procs.descendants(proc.pid)  # the capture's reader and the listeners
    proc.kill()
    proc.wait(timeout=10)
    assert not (left := procs.wait_gone(children, 5.0)), f"outlived `nftdivert run`: {left}"
    assert ("192.0.2.10", "198.51.100.60", "45678") in _tshark(pcap, "ip.src", "ip.dst", "tcp.dstport")


def test_an_unwritable_pcap_path_is_bad_input_and_nothing_is_applied(host, tmp_path):
    proc = harness.nftdivert(host, "run", "-w", str(tmp_path / "no-such-dir" / "x.pcap"), check=False)
    assert proc.returncode == 2
    assert "worker.pcap (-w)" in proc.stderr and "No such file or directory" in proc.stderr
    assert host.run("nft", "list", "ruleset").stdout == ""


def test_sigkill_of_run_takes_its_listener_process_along(host, tmp_path):
    proc = start(host, tmp_path)
    children = procs.descendants(proc.pid)  # the built-in listeners' process
    assert children
    proc.kill()
    proc.wait(timeout=10)
    assert not (left := procs.wait_gone(children, 1.0)), f"outlived `nftdivert run` by more than a second: {left}"


def _path_without_iptables(tmp_path):
    """A PATH with `ip` (for `ip netns exec`) and none of the iptables tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ip").symlink_to(shutil.which("ip"))
    return str(bin_dir)


@pytest.mark.parametrize("after_stop", ["keep", "remove"])
def test_a_start_that_fails_after_the_commit_leaves_no_diverting_table(tmp_path, make_netns, after_stop):
    # The xt backend without iptables fails after the table is committed: the
    # table must go (or shrink to containment), not stay loaded and diverting.
    ns = make_netns("noipt")
    cfg = tmp_path / "xt.toml"
    keep_is_default = after_stop == "keep"
    cfg.write_text(("" if keep_is_default else f'containment_after_stop = "{after_stop}"\n')
                   + '[queue]\nbackend = "xt"\n')
    env = dict(harness._env(), PATH=_path_without_iptables(tmp_path))
    proc = ns.run(sys.executable, "-m", "nftdivert", "run", "-c", str(cfg), env=env, check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "iptables-nft-save is missing" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if after_stop == "keep":
        harness.assert_contained(ns)
    else:
        assert ns.run("nft", "list", "ruleset").stdout == ""
    assert harness.queue_bindings(ns) == []


def test_a_capture_that_cannot_be_written_stops_the_run_with_one_line(host, tmp_path):
    # /dev/full opens, then every flush fails (ENOSPC): before, a traceback from the worker's tick.
    proc = host.popen(*nftdivert_argv("run", "-c", str(_local_config(tmp_path)), "--write-rewritten", "/dev/full",
                                      "--log", ""), env=harness._env(), text=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "nftdivert: cannot write the capture /dev/full: No space left on device" in err, err
    assert "Traceback" not in err
    assert host.run("nft", "list", "ruleset").stdout == ""  # local mode: no containment to keep


def test_a_pcap_that_cannot_be_written_stops_the_run_before_it_diverts(host, tmp_path):
    # The run must not go on capturing into nothing. Before, it came up, diverted, and
    # stopped only once the reader's first block of packets found the disk full.
    proc = host.popen(*nftdivert_argv("run", "-c", str(_local_config(tmp_path)), "--log", str(tmp_path / "log"),
                                      "-w", "/dev/full"), env=harness._env(), text=True, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert err.splitlines()[-1] == "nftdivert: cannot write the capture /dev/full: No space left on device", err
    assert "Traceback" not in err and "listener " not in err, err  # it stopped before the listeners came up
    assert not (tmp_path / "log").read_text()  # not one conversation was diverted, nor logged
    assert host.run("nft", "list", "ruleset").stdout == ""


def test_the_final_counters_show_hook_errors_and_the_log(host, tmp_path):
    proc = start(host, tmp_path)
    # The worker pumps once its counters are published (a SIGTERM before that stops the start).
    harness.wait_for(lambda: "worker: pid" in harness.nftdivert(host, "status").stdout, 30, "the worker's counters")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "new-conversation hook errors 0, log lines 0 (dropped 0, failed 0)" in err, err


def test_a_reload_applies_only_the_answer_sections():
    from nftdivert.config import from_mapping
    from nftdivert.runner import not_reloadable

    running = from_mapping({})
    answers = from_mapping({"dns": {"one_address": "192.0.2.9"}, "http": {"server": "panel"},
                            "custom": [{"protocol": "tcp", "ports": [4444], "static": "hi"}]})
    assert not_reloadable(running, answers) == []
    shaped = from_mapping({"leave_alone": {"tcp_ports": [22]}, "dns": {"one_address": "192.0.2.9"}})
    assert not_reloadable(running, shaped) == ["leave_alone"]
    assert not_reloadable(running, from_mapping({"dns": {"pool_key": "lab"}})) == ["dns"]  # the pool: not an answer
