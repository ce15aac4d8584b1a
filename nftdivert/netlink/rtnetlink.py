"""rtnetlink: this network namespace's addresses (RTM_GETADDR) and devices (RTM_GETLINK).

Hand-written rather than pyroute2: pyroute2 is no dependency of nftdivert
(nor installed with it), and each question here is one dump read with the
codec's loop.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from nftdivert.netlink.codec import attrs, dump, open_socket

RTM_GETLINK = 18
RTM_GETADDR = 22
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 1, 3, 10, 18
IFLA_INFO_KIND = 1
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFA_F_SECONDARY, IFA_F_OPTIMISTIC, IFA_F_TENTATIVE = 0x01, 0x04, 0x40
RT_SCOPE_UNIVERSE = 0


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address of this namespace, as RTM_GETADDR reports it."""

    family: int  # socket.AF_INET or AF_INET6
    prefix: int
    flags: int  # IFA_FLAGS when present (it holds the bits beyond the first 8)
    scope: int
    index: int  # the interface's
    address: bytes


@dataclass(frozen=True, slots=True)
class Link:
    """One network device, as RTM_GETLINK reports it."""

    index: int
    name: str
    kind: str  # "bridge", "veth", ... ("" when the kernel names none)
    master: int  # the index of the device it is enslaved to, 0 for none
    address: bytes  # its link-layer address


def interface_addresses() -> list[InterfaceAddress]:
    """This namespace's addresses, in the order the kernel keeps them per interface."""
    found = []
    with open_socket(socket.NETLINK_ROUTE) as sock:
        for _type, body in dump(sock, RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family, prefix, flags, scope, index = IFADDRMSG.unpack_from(body)
            found_attrs = attrs(body[IFADDRMSG.size:])
            # IPv4 names its own address IFA_LOCAL (IFA_ADDRESS may be a peer's); IPv6 only IFA_ADDRESS.
            address = found_attrs.get(IFA_LOCAL) or found_attrs.get(IFA_ADDRESS)
            if address:
                if IFA_FLAGS in found_attrs:
                    flags = struct.unpack_from("=I", found_attrs[IFA_FLAGS])[0]
                found.append(InterfaceAddress(family, prefix, flags, scope, index, bytes(address)))
    return found


def _text(value: memoryview | None) -> str:
    return bytes(value or b"").rstrip(b"\0").decode(errors="replace")


def links() -> list[Link]:
    """This namespace's network devices."""
    found = []
    with open_socket(socket.NETLINK_ROUTE) as sock:
        for _type, body in dump(sock, RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            index = IFINFOMSG.unpack_from(body)[2]
            found_attrs = attrs(body[IFINFOMSG.size:])
            info = attrs(found_attrs.get(IFLA_LINKINFO, b""))
            master = found_attrs.get(IFLA_MASTER)
            found.append(Link(index, _text(found_attrs.get(IFLA_IFNAME)), _text(info.get(IFLA_INFO_KIND)),
                              struct.unpack_from("=I", master)[0] if master is not None else 0,
                              bytes(found_attrs.get(IFLA_ADDRESS, b""))))
    return found
