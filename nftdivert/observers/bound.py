"""Which (address, port) pairs this host's sockets answer on, asked of the
kernel (sock_diag) in this network namespace, and the nft commands that
mirror them into the table's bound sets.

A port is bound only for the family and address a diverted conversation
would reach. After `redirect` the destination is the incoming interface's
address (gateway) or 127.0.0.1 / ::1 (local mode), so a service on
127.0.0.1:9000 does not make 198.51.100.7:9000 bound for a gateway client,
and an IPv4-only socket does not make a port bound for IPv6. A wildcard
socket counts for every address of its family, and an IPv6 wildcard socket
without IPV6_V6ONLY for IPv4's too: sock_diag says which (/proc/net does not).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from nftdivert.worker.packet import TCP, UDP

ANY = b""  # the wildcard address: every address of the family

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_SKV6ONLY = 11
_TCP_LISTEN = 1 << 10
_UDP_UNCONNECTED = 1 << 7  # TCP_CLOSE: a connected UDP socket hears only its peer
_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBxI48x")  # inet_diag_req_v2, any socket id
_MSG = struct.Struct("=BBxxHH16s16s")  # family, state, sport, dport, src, dst (inet_diag_msg head)
_MSG_SIZE = 72
_ATTR = struct.Struct("=HH")
_V4_MAPPED = bytes(10) + b"\xff\xff"
_RTM_GETADDR = 22
_IFADDRMSG = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_IFA_ADDRESS, _IFA_LOCAL, _IFA_FLAGS = 1, 2, 8
_IFA_F_SECONDARY, _IFA_F_OPTIMISTIC, _IFA_F_TENTATIVE = 0x01, 0x04, 0x40
_RT_SCOPE_UNIVERSE = 0
LOOPBACK = {4: bytes([127, 0, 0, 1]), 6: bytes(15) + b"\1"}  # where `redirect` sends local traffic


@dataclass(frozen=True, slots=True)
class Listening:
    """One socket as sock_diag reports it."""

    protocol: int
    family: int  # socket.AF_INET or AF_INET6
    address: bytes  # 4 or 16 bytes
    port: int
    v6only: bool = False


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


def _netlink_dump(sock: socket.socket, kind: int, request: bytes) -> Iterator[bytes]:
    """Send one dump request; yield the body of each answer until the dump is done."""
    sock.send(_NLMSG.pack(_NLMSG.size + len(request), kind, _NLM_F_REQUEST_DUMP, 1, 0) + request)
    while True:
        data = sock.recv(1 << 16)
        at = 0
        while at + _NLMSG.size <= len(data):
            length, answer = _NLMSG.unpack_from(data, at)[:2]
            if answer == _NLMSG_DONE:
                return
            if answer == _NLMSG_ERROR:
                err = -struct.unpack_from("=i", data, at + _NLMSG.size)[0]
                raise OSError(err, f"netlink dump: {os.strerror(err)}")
            yield data[at + _NLMSG.size:at + length]
            at += (length + 3) & ~3


def _attributes(body: bytes, at: int) -> dict[int, bytes]:
    found = {}
    while at + _ATTR.size <= len(body):
        size, kind = _ATTR.unpack_from(body, at)
        found[kind] = body[at + _ATTR.size:at + size]
        at += max(_ATTR.size, (size + 3) & ~3)
    return found


def _dump(sock: socket.socket, family: int, protocol: int, states: int) -> list[Listening]:
    size = 4 if family == socket.AF_INET else 16
    out = []
    for body in _netlink_dump(sock, _SOCK_DIAG_BY_FAMILY, _REQ.pack(family, protocol, 0, states)):
        fam, _state, sport, _dport, src, _dst = _MSG.unpack_from(body)
        v6only = _attributes(body, _MSG_SIZE).get(_INET_DIAG_SKV6ONLY, b"\0")[:1] == b"\1"
        out.append(Listening(protocol, fam, src[:size], socket.ntohs(sport), v6only))
    return out


def sockets() -> list[Listening]:
    """Listening TCP and unconnected bound UDP sockets of this namespace, both families."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
        return [s for family in (socket.AF_INET, socket.AF_INET6)
                for protocol, states in ((TCP, _TCP_LISTEN), (UDP, _UDP_UNCONNECTED))
                for s in _dump(sock, family, protocol, states) if s.port]


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address of this namespace, as RTM_GETADDR reports it."""

    family: int  # socket.AF_INET or AF_INET6
    prefix: int
    flags: int  # IFA_FLAGS when present (it holds the bits beyond the first 8)
    scope: int
    index: int  # the interface's
    address: bytes


def interface_addresses() -> list[InterfaceAddress]:
    """This namespace's addresses, in the order the kernel keeps them per interface."""
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        for body in _netlink_dump(sock, _RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, prefix, flags, scope, index = _IFADDRMSG.unpack_from(body)
            attrs = _attributes(body, _IFADDRMSG.size)
            # IPv4 names its own address IFA_LOCAL (IFA_ADDRESS may be a peer's); IPv6 only IFA_ADDRESS.
            address = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if address:
                if _IFA_FLAGS in attrs:
                    flags = struct.unpack_from("=I", attrs[_IFA_FLAGS])[0]
                found.append(InterfaceAddress(family, prefix, flags, scope, index, address))
    return found


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
    return addresses_of(interface_addresses())


def addresses_of(known: list[InterfaceAddress]) -> Addresses:
    """Pure: addresses() from a dump."""
    redirect_to: dict[tuple[int, int], bytes] = {}
    for a in known:
        version = 4 if a.family == socket.AF_INET else 6
        usable = (not a.flags & _IFA_F_SECONDARY if version == 4 else a.scope == _RT_SCOPE_UNIVERSE
                  and not (a.flags & _IFA_F_TENTATIVE and not a.flags & _IFA_F_OPTIMISTIC))
        if usable:
            redirect_to.setdefault((version, a.index), a.address)
    return Addresses(frozenset(a.address for a in known),
                     frozenset((v, i, a) for (v, i), a in redirect_to.items()))


def read() -> BoundPorts:
    return from_sockets(sockets())


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
