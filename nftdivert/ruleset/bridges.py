"""Which bridges are on the client side, and their ports (RTM_GETLINK).

Two clients of one bridge reach each other at layer 2: their frames go
through this host's IP hooks only when net.bridge.bridge-nf-call-iptables
(and -ip6tables) say so. The ruleset's bridge table sends such frames up to
this host's IP stack instead, by giving them the bridge's own address; its
`client_ports` map holds that address for each port of a client-side
bridge. These functions find the ports and make the nft commands that fill
the map (interface indexes, never names: a name could hold a quote).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from nftdivert.netlink.rtnetlink import Link, links

MAP = "client_ports"
PORTS = "client_port_indexes"  # the same ports as a set, for a plain lookup
SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


@dataclass(frozen=True)
class Bridge:
    name: str
    address: str  # aa:bb:cc:dd:ee:ff
    ports: tuple[tuple[int, str], ...]  # (index, name), by index


def matches(name: str, patterns: Iterable[str]) -> bool:
    """nft's rule for `iifname`: a name, or a prefix followed by `*`; no patterns: every name."""
    patterns = tuple(patterns)
    return not patterns or any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def client_bridges(known: list[Link], interfaces: Iterable[str]) -> list[Bridge]:
    """Pure: the bridges the config's `interfaces` take as client side (all when
    empty), each with its address and its ports, by name."""
    interfaces = tuple(interfaces)
    found = []
    for br in sorted((x for x in known if x.kind == "bridge" and matches(x.name, interfaces)), key=lambda x: x.name):
        if len(br.address) != 6:
            continue  # not Ethernet: nothing to give the frames
        ports = tuple(sorted((x.index, x.name) for x in known if x.master == br.index))
        found.append(Bridge(br.name, br.address.hex(":"), ports))
    return found


def read(interfaces: Iterable[str]) -> list[Bridge]:
    return client_bridges(links(), interfaces)


def map_commands(table: str, bridges: list[Bridge]) -> str:
    """nft commands that make the bridge table's map say `bridges`."""
    name, ports = f"bridge {table} {MAP}", f"bridge {table} {PORTS}"
    elements = [f"{index} : {br.address}" for br in bridges for index, _ in br.ports]
    indexes = [str(index) for br in bridges for index, _ in br.ports]
    lines = [f"flush map {name}", f"flush set {ports}"]
    if elements:
        lines += [f"add element {name} {{ {', '.join(elements)} }}", f"add element {ports} {{ {', '.join(indexes)} }}"]
    return "".join(line + "\n" for line in lines)


def sysctls() -> dict[str, str]:
    """What this namespace's bridges pass to the IP hooks by themselves ({} without br_netfilter)."""
    found = {}
    for name in SYSCTLS:
        try:
            with open(f"/proc/sys/net/bridge/{name}", encoding="ascii") as f:
                found[name] = f.read().strip()
        except OSError:
            pass
    return found


def describe(bridges: list[Bridge], table: str) -> list[str]:
    """One line per client-side bridge, saying what happens to what its clients send each other."""
    settings = sysctls()
    said = ", ".join(f"{k} = {v}" for k, v in settings.items()) or "br_netfilter not loaded"
    return [f"bridge {br.name} ({len(br.ports)} port{'' if len(br.ports) == 1 else 's'}): what its clients send "
            f"each other goes to this host and is diverted like any other destination (table bridge {table}; "
            f"{said})" for br in bridges]
