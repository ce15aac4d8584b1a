"""The benchmark's two hosts: a client and a diverter namespace joined by a veth.

The diverter is 192.0.2.1/24 and the client 192.0.2.2/24, plus one address
per connection worker if asked. The client routes 198.51.100.0/24 to the
diverter and nowhere else, so nothing leaves the two namespaces.
"""

from __future__ import annotations

import shutil
import sys

from common import say

from nftdivert.lab import netns

NS_PREFIX = "ndb"  # namespaces ndb-client-<pid>-<n>, ndb-divert-<pid>-<n>
CLIENT_IF, DIVERT_IF = "ndb-c", "ndb-d"
CLIENT_ADDR, DIVERT_ADDR, LINK_PREFIX = "192.0.2.2", "192.0.2.1", 24
TARGETS = "198.51.100"  # the "arbitrary" destinations: 198.51.100.1-254, any port
LISTEN_PORT = 1337
STOP_GRACE = 5.0  # SIGTERM first: nftdivert removes its stats file under /run/nftdivert


def client_addr(i: int) -> str:
    return f"192.0.2.{2 + i}"


def remove_stale() -> None:
    """Namespaces of an earlier run that was SIGKILLed (its pid is gone)."""
    for name in netns.remove_stale(NS_PREFIX, grace=STOP_GRACE):
        say(f"removed stale namespace {name} (its benchmark pid is gone)")


class Topology:
    def __init__(self, client_addrs: int = 1) -> None:
        self.client_addrs = client_addrs
        self.made: list[netns.Netns] = []

    def up(self) -> None:
        self.client = self._create("client")
        self.divert = self._create("divert")
        say(f"created namespaces {self.client.name}, {self.divert.name}")
        # One address per connection worker: each acts as a host of its own.
        client_addrs = [f"{client_addr(i)}/{LINK_PREFIX}" for i in range(self.client_addrs)]
        netns.veth(self.client, CLIENT_IF, client_addrs, self.divert, DIVERT_IF, [f"{DIVERT_ADDR}/{LINK_PREFIX}"])
        self.client.run("ip", "route", "add", f"{TARGETS}.0/24", "via", DIVERT_ADDR, "src", CLIENT_ADDR)
        # Neighbour entry up front, so the first phase does not pay for ARP.
        self.client.run("ping", "-c", "1", "-W", "2", DIVERT_ADDR, check=False)

    def _create(self, role: str) -> netns.Netns:
        ns = netns.Netns.create(f"{NS_PREFIX}-{role}")
        self.made.append(ns)
        return ns

    def flush_conntrack(self) -> None:
        if shutil.which("conntrack"):
            self.divert.run("conntrack", "-F", check=False)

    def close(self) -> None:
        """Stop every process in both namespaces and remove them; never raises."""
        made, self.made = self.made, []
        for ns in made:
            ns.delete(grace=STOP_GRACE)
        left = [ns.name for ns in made if ns.exists()]
        if left:
            print(f"divert_bench: WARNING: could not remove {left}", file=sys.stderr)
        elif made:
            say(f"removed namespaces {', '.join(ns.name for ns in made)}")

