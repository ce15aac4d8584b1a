"""The Community ID of a flow (version 1, seed 0): the hash Zeek, Suricata, Arkime
and Elastic join their records on (pure).

Written by hand rather than with the `communityid` package: the package took
21 µs per ID (its FlowTuple converts and validates each value), this 0.7 µs,
measured on the same busy 2-core machine; the observer spends about 57 µs on
an event, and a TCP conversation gets an ID in its start and its end, so the
package would have added a third to the observer's cost per conversation.
tests/observers/test_flowid.py proves both give the same IDs.

The tuple is the one the client asked for: its own address and port, the
destination it asked for (before NAT), the protocol. ICMP's type and code
stand in for ports as Zeek maps them: a request and its reply pair up.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

from nftdivert.netlink.ipproto import ICMP, ICMPV6, TCP, UDP

VERSION = "1:"
_SEED = b"\0\0"  # seed 0, two bytes
SCTP = 132
# Protocols whose flows have ports (or ICMP's stand-ins for them).
_PORTED = {ICMP, ICMPV6, TCP, UDP, SCTP}
# A request type -> its reply's, both ways: these pair up as one flow; other
# types are one-way, hashed as sent.
_ICMP_PAIRS = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10, 17: 18, 18: 17}
_ICMPV6_PAIRS = {128: 129, 129: 128, 130: 131, 131: 130, 133: 134, 134: 133, 135: 136, 136: 135,
                 139: 140, 140: 139, 144: 145, 145: 144}
_NAMES = {"tcp": TCP, "udp": UDP, "icmp": ICMP, "icmpv6": ICMPV6}


def community_id(protocol: int, src: bytes, dst: bytes, sport: int | None = None, dport: int | None = None) -> str:
    """"1:..." for the flow from src (packed address) to dst; for ICMP, sport and dport are the type and code."""
    one_way = False
    if protocol in (ICMP, ICMPV6) and sport is not None:
        pairs = _ICMP_PAIRS if protocol == ICMP else _ICMPV6_PAIRS
        if sport in pairs:
            dport = pairs[sport]
        else:
            one_way = True
    ports = b"" if sport is None or dport is None else struct.pack("!HH", sport, dport)
    if not one_way and (src > dst or (src == dst and ports[:2] > ports[2:])):
        src, dst, ports = dst, src, ports[2:] + ports[:2]
    digest = hashlib.sha1(_SEED + src + dst + bytes((protocol, 0)) + ports).digest()
    return VERSION + base64.b64encode(digest).decode("ascii")


def of_sockets(protocol: int, client: tuple, destination: tuple | None) -> str | None:
    """A listener's view: the client's socket address and the (host, port) it asked for; None if unknown.

    An IPv4 client on a dual-stack socket shows as "::ffff:192.0.2.2": hashed as the IPv4 address it is.
    """
    if destination is None:
        return None
    return of_endpoints(protocol, (client[0].removeprefix("::ffff:"), client[1]),
                        (destination[0].removeprefix("::ffff:"), destination[1]))


def protocol_number(name: str | int) -> int | None:
    """The record's `protocol` ("tcp", "253") as a number; None if it is neither."""
    if isinstance(name, int):
        return name if 0 <= name < 256 else None
    if name in _NAMES:
        return _NAMES[name]
    return int(name) if name.isascii() and name.isdigit() and int(name) < 256 else None


def of_endpoints(protocol: str | int, client: tuple[str, int | None], destination: tuple[str, int | None],
                 icmp: tuple[int, int] | None = None) -> str | None:
    """The ID of a record's flow, from its address texts; None when they do not make one."""
    number = protocol_number(protocol)
    try:
        src, dst = ipaddress.ip_address(client[0]).packed, ipaddress.ip_address(destination[0]).packed
    except ValueError:
        return None
    if number is None or len(src) != len(dst):
        return None
    if icmp is not None:
        return community_id(number, src, dst, *icmp)
    if number in _PORTED and (client[1] is None or destination[1] is None):
        return None  # a ported protocol's record without its ports
    return community_id(number, src, dst, client[1], destination[1])
