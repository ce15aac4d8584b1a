"""`nftdivert run` on one host in local mode: the pcap it writes, bad paths.

(The gateway scenarios live in the test_e2e modules.)
"""

from __future__ import annotations

import signal
import subprocess

import pytest

import lab
import netns
import procs
from conftest import nftdivert_argv

pytestmark = pytest.mark.kernel


@pytest.fixture
def host():
    h = lab.build_local_host(netns)
    try:
        yield h
    finally:
        h.delete()


def start(host, tmp_path, *args):
    cfg = tmp_path / "local.toml"
    cfg.write_text(lab.config_text(mode="local"))
    proc = host.popen(*nftdivert_argv("run", "-c", str(cfg), "--log", str(tmp_path / "log.jsonl"), *args),
                      env=lab._env(), text=True)
    lab.wait_for(lambda: lab.table_handle(host) is not None and lab.port_bound(host, "tcp", 1337), 30,
                 "nftdivert run to come up", detail=lambda: proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_pcap_holds_each_diverted_packet_as_it_arrived_and_as_rewritten(host, tmp_path):
    pcap = tmp_path / "divert.pcap"
    proc = start(host, tmp_path, "-w", str(pcap))
    reply = lab.run_client(host, "tcp", "198.51.100.60", "45678", "captured")
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


def test_an_unwritable_pcap_path_is_bad_input_and_nothing_is_applied(host, tmp_path):
    proc = lab.nftdivert(host, "run", "-w", str(tmp_path / "no-such-dir" / "x.pcap"), check=False)
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
