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

import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from nftdivert.observers.bound import _attributes, _netlink_dump  # the one netlink dump reader

_RTM_GETLINK = 18
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFLA_ADDRESS, _IFLA_IFNAME, _IFLA_MASTER, _IFLA_LINKINFO = 1, 3, 10, 18
_IFLA_INFO_KIND = 1
MAP = "client_ports"
PORTS = "client_port_indexes"  # the same ports as a set, for a plain lookup
SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    kind: str  # "bridge", "veth", ... ("" when the kernel names none)
    master: int  # the index of the device it is enslaved to, 0 for none
    address: bytes  # its link-layer address


@dataclass(frozen=True)
class Bridge:
    name: str
    address: str  # aa:bb:cc:dd:ee:ff
    ports: tuple[tuple[int, str], ...]  # (index, name), by index


def links() -> list[Link]:
    """This namespace's network devices."""
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        for body in _netlink_dump(sock, _RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            index = _IFINFOMSG.unpack_from(body)[2]
            attrs = _attributes(body, _IFINFOMSG.size)
            info = _attributes(attrs.get(_IFLA_LINKINFO, b""), 0)
            master = attrs.get(_IFLA_MASTER, b"\0\0\0\0")
            found.append(Link(index, attrs.get(_IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
                              info.get(_IFLA_INFO_KIND, b"").rstrip(b"\0").decode(errors="replace"),
                              struct.unpack_from("=I", master)[0], attrs.get(_IFLA_ADDRESS, b"")))
    return found


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
