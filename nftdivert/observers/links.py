"""Which interface a client is on: the one whose subnet holds its address.

Conntrack does not record the interface a conversation came in on, so the
log derives it: a client of this host's own (local mode) is on `lo`; a
gateway client on the interface whose address prefix holds it. A client
routed to us through another router is on none of them: "".
"""
from __future__ import annotations

import ipaddress
import socket

from nftdivert.netlink.rtnetlink import interface_addresses

Subnet = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, bytes]  # (prefix, interface, own address)


def subnets() -> list[Subnet]:
    """This namespace's addresses with their prefixes and interface names."""
    found = []
    for a in interface_addresses():
        try:
            name = socket.if_indextoname(a.index)
        except OSError:
            name = str(a.index)
        found.append((ipaddress.ip_network((a.address, a.prefix), strict=False), name, a.address))
    return found


def interface_for(client: bytes, known: list[Subnet]) -> str:
    """Pure: "lo" for one of our own addresses, else the interface of the longest matching prefix."""
    if any(own == client for _net, _name, own in known):
        return "lo"
    addr = ipaddress.ip_address(client)
    best = max((net for net in known if net[0].version == addr.version and addr in net[0]),
               key=lambda net: net[0].prefixlen, default=None)
    return best[1] if best else ""
