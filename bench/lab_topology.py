"""The lab row's hosts: N client namespaces on one bridge behind one gateway.

    client i (192.0.2.10+i, eth0) --- port p<i> of bridge br0 (192.0.2.1/24)
    in the gateway namespace, where `nftdivert run` runs

Every client routes everything through the gateway, IPv4 only (IPv6 is
off in the clients: no router solicitations in the log). The gateway has
no other link and its containment drops what it does not answer, so
nothing leaves the namespaces. A client may open ping sockets (ICMP echo
without raw sockets). Named `ndl-gw-<pid>-<n>` and `ndl-c<i>-<pid>-<n>`:
a later run removes what a SIGKILLed one left, as topology.py does.
"""

from __future__ import annotations

import subprocess
import sys

from common import say

from nftdivert.lab import netns

NS_PREFIX = "ndl"
BRIDGE = "br0"
GATEWAY_ADDR, LINK_PREFIX = "192.0.2.1", 24
FIRST_CLIENT = 10
MAX_CLIENTS = 200
STOP_GRACE = 5.0  # SIGTERM first: nftdivert removes its stats file under /run/nftdivert
CLIENT_SYSCTLS = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                  "net.ipv4.ping_group_range=0 2147483647")


def client_addr(i: int) -> str:
    return f"192.0.2.{FIRST_CLIENT + i}"


def remove_stale() -> None:
    for name in netns.remove_stale(NS_PREFIX, grace=STOP_GRACE):
        say(f"removed stale namespace {name} (its benchmark pid is gone)")


def _batch(ns: netns.Netns, commands: list[str]) -> None:
    ns.run("ip", "-batch", "-", input="".join(c + "\n" for c in commands))


class LabTopology:
    def __init__(self, clients: int) -> None:
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients: 1-{MAX_CLIENTS}")
        self.n = clients
        self.clients: list[netns.Netns] = []
        self.divert: netns.Netns | None = None  # the gateway; named as in topology.Topology for sides.py
        self.made: list[netns.Netns] = []

    def up(self) -> None:
        self.divert = self._create("gw")
        self.divert.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        _batch(self.divert, [f"link add {BRIDGE} type bridge", f"addr add {GATEWAY_ADDR}/{LINK_PREFIX} dev {BRIDGE}",
                             f"link set {BRIDGE} up"])
        for i in range(self.n):
            client = self._create(f"c{i}")
            self.clients.append(client)
            client.run("sysctl", "-qw", *CLIENT_SYSCTLS)
            # Both ends made inside their namespaces: no name in the host's namespace can clash.
            subprocess.run(["ip", "link", "add", "eth0", "netns", client.name, "type", "veth", "peer", "name",
                            f"p{i}", "netns", self.divert.name], check=True, capture_output=True)
            _batch(self.divert, [f"link set p{i} master {BRIDGE}", f"link set p{i} up"])
            _batch(client, [f"addr add {client_addr(i)}/{LINK_PREFIX} dev eth0", "link set eth0 up",
                            f"route add default via {GATEWAY_ADDR}"])
        say(f"created the lab: gateway {self.divert.name}, {self.n} clients on {BRIDGE}")

    def _create(self, role: str) -> netns.Netns:
        ns = netns.Netns.create(f"{NS_PREFIX}-{role}")
        self.made.append(ns)
        return ns

    def flush_conntrack(self) -> None:
        self.divert.run("conntrack", "-F", check=False)

    def close(self) -> None:
        """Stop every process in the lab and remove its namespaces; never raises."""
        made, self.made = self.made, []
        for ns in reversed(made):  # the clients first, the gateway (nftdivert's) last
            ns.delete(grace=STOP_GRACE if ns is self.divert else 0.0)
        left = [ns.name for ns in made if ns.exists()]
        if left:
            print(f"divert_bench: WARNING: could not remove {left}", file=sys.stderr)
        elif made:
            say(f"removed the lab's {len(made)} namespaces")
