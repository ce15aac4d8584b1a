"""The observer against the real kernel: only entries with our ct mark, one start and one end each.

In a namespace of its own, two tables redirect local connections: ours marks
its conversations with the ct mark bit, another table marks its own with
another bit. The observer must write records for ours alone: a start at the
NEW event, an end at the DESTROY event (conntrack -D forgets one by hand),
and an `open` end from the dump at close for what conntrack still tracks.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.kernel

RULESET = """\
table inet ours {
	chain out {
		type nat hook output priority -100; policy accept;
		ip daddr { 198.51.100.1, 198.51.100.3 } ct mark set ct mark | 0x200000 redirect
	}
}
table inet theirs {
	chain out {
		type nat hook output priority -101; policy accept;
		ip daddr 198.51.100.2 ct mark set ct mark | 0x1 redirect
	}
}
"""

SCRIPT = r"""
import json, socket, subprocess, threading, time
from nftdivert.observers import ctsettings
from nftdivert.observers.observer import Observer

records = []
obs = Observer(0x200000, lambda rec, when: records.append(rec), lambda ev, when: ("echo", 4444))
with ctsettings.accounting():
    tcp = socket.create_server(("0.0.0.0", 4444))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 4444))  # replies from the address the redirect chose

    def serve():
        while True:
            conn, _ = tcp.accept()
            conn.sendall(conn.recv(100))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    for dst in ("198.51.100.1", "198.51.100.2"):
        c = socket.create_connection((dst, 4444))
        c.sendall(b"hello")
        c.recv(100)
        c.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b"datagram", ("198.51.100.3", 4444))
    data, peer = udp.recvfrom(100)
    udp.sendto(data, peer)
    u.recv(100)
    time.sleep(0.3)
    subprocess.run(["conntrack", "-D", "-p", "tcp", "--orig-dst", "198.51.100.1"], capture_output=True)
    deadline = time.monotonic() + 10
    while len(records) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    obs.close()
print(json.dumps({"records": records, "counts": obs.counts()}))
"""


def test_only_our_conversations_one_start_and_one_end_each(host):
    host.run("ip", "link", "add", "out0", "type", "veth", "peer", "name", "void0")
    host.run("ip", "addr", "add", "192.0.2.10/24", "dev", "out0")
    for dev in ("out0", "void0", "lo"):
        host.run("ip", "link", "set", dev, "up")
    host.run("ip", "route", "add", "default", "dev", "out0")
    host.run("nft", "-f", "-", input=RULESET)
    proc = host.run(sys.executable, "-c", SCRIPT, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    out = json.loads(proc.stdout)
    assert not any(out["counts"].values()), out  # nothing lost, failed, synthesized or skipped
    recs = out["records"]
    assert not [r for r in recs if r["original_destination"].startswith("198.51.100.2:")], recs  # theirs
    tcp = [r for r in recs if r["original_destination"] == "198.51.100.1:4444"]
    assert [r["event"] for r in tcp] == ["start", "end"] and tcp[0]["id"] == tcp[1]["id"], recs
    assert tcp[1]["ended"] == "closed" and tcp[1]["sent"]["packets"] >= 4, tcp  # forgotten in TIME_WAIT
    udp = [r for r in recs if r["original_destination"] == "198.51.100.3:4444"]
    assert [r["event"] for r in udp] == ["start", "end"] and udp[1]["ended"] == "open", recs
    assert udp[1]["sent"] == {"packets": 1, "bytes": 36} and udp[1]["received"] == {"packets": 1, "bytes": 36}
    assert tcp[0]["interface"] == udp[0]["interface"] == "lo", recs


def test_the_sysctls_come_back(host):
    host.run("sysctl", "-qw", "net.netfilter.nf_conntrack_acct=0")
    script = "from nftdivert.observers import ctsettings\nwith ctsettings.accounting(): print(open(" \
             "'/proc/sys/net/netfilter/nf_conntrack_acct').read().strip())"
    proc = host.run(sys.executable, "-c", script, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.strip() == "1"
    assert host.run("sysctl", "-n", "net.netfilter.nf_conntrack_acct").stdout.strip() == "0"
