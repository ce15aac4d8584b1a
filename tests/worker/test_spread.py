"""spread.worker_for against the kernel's own `jhash`: real packets from many
client addresses through a table that records each source with the hash nft
computed for it (as the packet's mark), compared with ours."""

from __future__ import annotations

import ipaddress
import json

import pytest

from nftdivert.worker import spread

SOURCES_V4 = [f"198.18.{i // 200}.{1 + i % 200}" for i in range(64)]
SOURCES_V6 = [f"2001:db8:7::{i + 1:x}" for i in range(64)]
MODULUS = 1_000_003  # a large modulus keeps nearly all the hash's bits in the comparison

RULESET = f"""
table inet spread_probe {{
    set v4 {{ type ipv4_addr . mark; size 1024; }}
    set v6 {{ type ipv6_addr . mark; size 1024; }}
    chain out {{
        type filter hook output priority 0; policy accept;
        udp dport 9 meta nfproto ipv4 meta mark set jhash ip saddr mod {MODULUS} seed {spread.SEED:#x} add @v4 {{ ip saddr . meta mark }}
        udp dport 9 meta nfproto ipv6 meta mark set jhash ip6 saddr mod {MODULUS} seed {spread.SEED:#x} add @v6 {{ ip6 saddr . meta mark }}
    }}
}}
"""

SEND = """
import socket, sys
for family, dst, sources in ((socket.AF_INET, "198.51.100.9", sys.argv[1].split(",")),
                             (socket.AF_INET6, "2001:db8:ff::9", sys.argv[2].split(","))):
    for src in sources:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((src, 0))
        s.sendto(b"x", (dst, 9))
        s.close()
"""


@pytest.fixture
def host(make_netns):
    ns = make_netns("spread")
    ns.run("ip", "link", "set", "lo", "up")
    for src in SOURCES_V4:
        ns.run("ip", "addr", "add", f"{src}/32", "dev", "lo")
    for src in SOURCES_V6:
        ns.run("ip", "addr", "add", f"{src}/128", "dev", "lo", "nodad")
    ns.run("ip", "route", "add", "198.51.100.0/24", "dev", "lo")
    ns.run("ip", "-6", "route", "add", "2001:db8:ff::/64", "dev", "lo")
    ns.run("nft", "-f", "-", input=RULESET)
    return ns


def test_worker_for_is_the_kernels_jhash(host):
    import sys
    host.run(sys.executable, "-c", SEND, ",".join(SOURCES_V4), ",".join(SOURCES_V6))
    kernel = {}
    for name in ("v4", "v6"):
        listed = json.loads(host.run("nft", "-j", "list", "set", "inet", "spread_probe", name).stdout)
        for item in listed["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                address, mark = elem["concat"]
                kernel[address] = mark
    assert set(kernel) == set(SOURCES_V4) | set(SOURCES_V6)  # every packet went through the rule
    ours = {a: (spread.jhash(ipaddress.ip_address(a).packed, spread.SEED) * MODULUS) >> 32 for a in kernel}
    assert ours == kernel


def test_worker_for_spreads_a_lab_over_every_worker():
    lab = [ipaddress.ip_address(f"10.0.1.{i}").packed for i in range(1, 51)]
    for workers in (2, 3, 4):
        owners = [spread.worker_for(a, workers) for a in lab]
        assert set(owners) == set(range(workers))
        assert max(owners.count(w) for w in range(workers)) <= 2 * len(lab) // workers
    assert {spread.worker_for(a, 1) for a in lab} == {0}
