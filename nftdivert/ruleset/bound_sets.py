"""Which (address, port) pairs this host's sockets answer on, and the nft
commands that mirror them into the table's bound sets.

A port is bound only for the family and address a diverted conversation
would reach. After `redirect` the destination is the incoming interface's
address (gateway) or 127.0.0.1 / ::1 (local mode), so a service on
127.0.0.1:9000 does not make 198.51.100.7:9000 bound for a gateway client,
and an IPv4-only socket does not make a port bound for IPv6. A wildcard
socket counts for every address of its family, and an IPv6 wildcard socket
without IPV6_V6ONLY for IPv4's too: sock_diag says which (/proc/net does not).
The kernel is read in nftdivert.netlink (sock_diag, rtnetlink).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Iterable

from nftdivert.netlink import rtnetlink, sock_diag
from nftdivert.netlink.ipproto import TCP, UDP
from nftdivert.netlink.rtnetlink import IFA_F_OPTIMISTIC, IFA_F_SECONDARY, IFA_F_TENTATIVE, RT_SCOPE_UNIVERSE
from nftdivert.netlink.sock_diag import Listening

ANY = b""  # the wildcard address: every address of the family

_V4_MAPPED = bytes(10) + b"\xff\xff"
LOOPBACK = {4: bytes([127, 0, 0, 1]), 6: bytes(15) + b"\1"}  # where `redirect` sends local traffic


@dataclass(frozen=True)
class BoundPorts:
    """(protocol, IP version) -> {(address or ANY, port)}."""

    entries: dict[tuple[int, int], frozenset[tuple[bytes, int]]]

    def is_bound(self, protocol: int, address: bytes, port: int) -> bool:
        """Would a conversation to `address` (4 or 16 bytes), `port` reach a socket of its own?"""
        found = self.entries.get((protocol, 4 if len(address) == 4 else 6), frozenset())
        return (ANY, port) in found or (address, port) in found


def from_sockets(sockets: Iterable[Listening]) -> BoundPorts:
    """Pure: which (address, port) pairs the sockets answer on, per family."""
    found: dict[tuple[int, int], set[tuple[bytes, int]]] = {(p, v): set() for p in (TCP, UDP) for v in (4, 6)}
    for s in sockets:
        addr = s.address
        if s.family == socket.AF_INET:
            found[s.protocol, 4].add((ANY if addr == bytes(4) else addr, s.port))
        elif addr == bytes(16):
            found[s.protocol, 6].add((ANY, s.port))
            if not s.v6only:
                found[s.protocol, 4].add((ANY, s.port))
        elif addr.startswith(_V4_MAPPED):  # an IPv6 socket on one IPv4 address
            found[s.protocol, 4].add((addr[12:], s.port))
        else:
            found[s.protocol, 6].add((addr, s.port))
    # A wildcard entry covers the same port on one address.
    return BoundPorts({key: frozenset((a, p) for a, p in pairs if a == ANY or (ANY, p) not in pairs)
                       for key, pairs in found.items()})


@dataclass(frozen=True)
class Addresses:
    """This namespace's own unicast addresses, both families, and the one
    `redirect` gives a conversation arriving on each interface."""

    local: frozenset[bytes]
    redirect_to: frozenset[tuple[int, int, bytes]]  # (IP version, interface index, address)


def addresses() -> Addresses:
    """A conversation to any other address of ours (a broadcast, multicast or
    anycast one) is answered from one of `local`, chosen by the kernel.

    `redirect` on the prerouting hook takes the incoming interface's primary
    IPv4 address, or its first usable global IPv6 address, in the order the
    kernel keeps (and dumps) them."""
    return addresses_of(rtnetlink.interface_addresses())


def addresses_of(known: list[rtnetlink.InterfaceAddress]) -> Addresses:
    """Pure: addresses() from a dump."""
    redirect_to: dict[tuple[int, int], bytes] = {}
    for a in known:
        version = 4 if a.family == socket.AF_INET else 6
        usable = (not a.flags & IFA_F_SECONDARY if version == 4 else a.scope == RT_SCOPE_UNIVERSE
                  and not (a.flags & IFA_F_TENTATIVE and not a.flags & IFA_F_OPTIMISTIC))
        if usable:
            redirect_to.setdefault((version, a.index), a.address)
    return Addresses(frozenset(a.address for a in known),
                     frozenset((v, i, a) for (v, i), a in redirect_to.items()))


def read() -> BoundPorts:
    return from_sockets(sock_diag.listening())


def set_name(protocol: int, version: int) -> str:
    return f"bound_{'tcp' if protocol == TCP else 'udp'}_v{version}"


def _element(version: int, address: bytes, port: int) -> str:
    if address == ANY:
        return f"{'0.0.0.0/0' if version == 4 else '::/0'} . {port}"
    return f"{ipaddress.ip_address(address)} . {port}"


_FAMILY = {4: "ipv4", 6: "ipv6"}
_PROTO = {TCP: "tcp", UDP: "udp"}


def on_interface(ports: BoundPorts, redirect_to: Iterable[tuple[int, int, bytes]]) -> list[str]:
    """Kernel path, gateway: `nf_proto . iface_index . inet_proto . inet_service`
    elements for ports bound on the address `redirect` gives each interface.
    Wildcard sockets are left out: the ruleset's `socket` expression finds them."""
    return [f"{_FAMILY[version]} . {index} . {_PROTO[protocol]} . {port}"
            for version, index, address in sorted(redirect_to)
            for protocol in (TCP, UDP)
            for port in sorted(p for a, p in ports.entries.get((protocol, version), ()) if a == address)]


def on_loopback(ports: BoundPorts) -> list[str]:
    """Kernel path, local mode: `nf_proto . inet_proto . inet_service` elements
    for ports bound on 127.0.0.1 / ::1 (where `redirect` sends local traffic) or everywhere."""
    return [f"{_FAMILY[version]} . {_PROTO[protocol]} . {port}"
            for version in (4, 6) for protocol in (TCP, UDP)
            for port in sorted({p for a, p in ports.entries.get((protocol, version), ())
                                if a in (ANY, LOOPBACK[version])})]


def _fill(name: str, elements: list[str]) -> list[str]:
    return [f"flush set {name}"] + ([f"add element {name} {{ {', '.join(elements)} }}"] if elements else [])


def kernel_path_commands(table: str, ports: BoundPorts, redirect_to: Iterable[tuple[int, int, bytes]], *,
                         gateway: bool, local: bool) -> str:
    """nft commands that make the kernel path's sets say `ports` (those the ruleset has)."""
    lines = []
    if gateway:
        lines += _fill(f"inet {table} bound_on_interface", on_interface(ports, redirect_to))
    if local:
        lines += _fill(f"inet {table} bound_on_loopback", on_loopback(ports))
    return "".join(line + "\n" for line in lines)


def serving_commands(table: str) -> str:
    """Renew the kernel path's fail-closed elements (their timeout starts again)."""
    return "".join(line + "\n" for line in _fill(f"inet {table} serving", ["ipv4", "ipv6"]))


def set_commands(table: str, ports: BoundPorts) -> str:
    """nft commands that make the table's bound sets say `ports`."""
    lines = []
    for (protocol, version), pairs in sorted(ports.entries.items()):
        name = f"inet {table} {set_name(protocol, version)}"
        lines.append(f"flush set {name}")
        if pairs:
            elements = ", ".join(_element(version, a, p) for a, p in sorted(pairs, key=lambda x: (x[1], x[0])))
            lines.append(f"add element {name} {{ {elements} }}")
    return "\n".join(lines) + "\n"
