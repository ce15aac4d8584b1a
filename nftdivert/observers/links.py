"""Which interface a client is on: the one whose subnet holds its address.

Conntrack does not record the interface a conversation came in on, so the
log derives it: a client of this host's own (local mode) is on `lo`; a
gateway client on the interface whose address prefix holds it. A client
routed to us through another router is on none of them: "".
"""
from __future__ import annotations

import ipaddress
import socket
import struct

from nftdivert.observers.bound import _IFA_ADDRESS, _IFA_LOCAL, _RTM_GETADDR, _attributes, _netlink_dump

_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index

Subnet = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str, bytes]  # (prefix, interface, own address)


def subnets() -> list[Subnet]:
    """This namespace's addresses with their prefixes and interface names."""
    found = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        for body in _netlink_dump(sock, _RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _family, prefix, _flags, _scope, index = _IFADDRMSG.unpack_from(body)
            attrs = _attributes(body, _IFADDRMSG.size)
            own = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
            if not own:
                continue
            try:
                name = socket.if_indextoname(index)
            except OSError:
                name = str(index)
            found.append((ipaddress.ip_network((own, prefix), strict=False), name, own))
    return found


def interface_for(client: bytes, known: list[Subnet]) -> str:
    """Pure: "lo" for one of our own addresses, else the interface of the longest matching prefix."""
    if any(own == client for _net, _name, own in known):
        return "lo"
    addr = ipaddress.ip_address(client)
    best = max((net for net in known if net[0].version == addr.version and addr in net[0]),
               key=lambda net: net[0].prefixlen, default=None)
    return best[1] if best else ""
