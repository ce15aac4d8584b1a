"""sock_diag (inet_diag): the sockets of this network namespace, asked of the kernel.

Two questions: which sockets listen (TCP) or wait unconnected (UDP), one
dump per family and protocol; and which socket (its uid and inode) is one
conversation's. /proc/net/{tcp,udp}* would answer the first too, but not
whether an IPv6 wildcard socket is IPV6_V6ONLY. One order: close a
listener's TCP socket lingering in TIME_WAIT (SOCK_DESTROY), when the kernel
gave a new conversation its tuple.

Hand-written rather than pyroute2: pyroute2 is no dependency of nftdivert
(nor installed with it), and a request here is one struct and a loop over
the codec's messages.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from nftdivert.netlink.codec import (NETLINK_SOCK_DIAG, NLM_F_REQUEST, attrs, dump, message, messages, open_socket,
                                     request)
from nftdivert.netlink.ipproto import TCP, UDP

SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21  # needs CONFIG_INET_DIAG_DESTROY (Debian's kernels have it)
TCP_TIME_WAIT = 6  # enum tcp_state
INET_DIAG_SKV6ONLY = 11
TCP_LISTEN = 1 << 10  # states, as a bit mask of enum tcp_state
UDP_UNCONNECTED = 1 << 7  # TCP_CLOSE: a connected UDP socket hears only its peer
ALL_STATES = 0xFFFFFFFF
# inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport (be16),
# src[4], dst[4] (be32 words), if, cookie[2]
REQ = struct.Struct("=BBBxI2s2s16s16sI8s")
NOCOOKIE = b"\xff" * 8
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport, src, dst, if, cookie),
# expires, rqueue, wqueue, uid, inode
MSG = struct.Struct("=BBxxHH16s16s12xIIIII")
COOKIE = slice(44, 52)  # inet_diag_msg's idiag_cookie (after family..retrans 4, ports 4, addresses 32, if 4)


@dataclass(frozen=True, slots=True)
class Listening:
    """One socket as sock_diag reports it."""

    protocol: int
    family: int  # socket.AF_INET or AF_INET6
    address: bytes  # 4 or 16 bytes
    port: int
    v6only: bool = False


def _request(family: int, protocol: int, states: int, sport: int = 0, dport: int = 0,
             src: bytes = b"", dst: bytes = b"") -> bytes:
    return REQ.pack(family, protocol, 0, states, struct.pack("!H", sport), struct.pack("!H", dport),
                    src.ljust(16, b"\0"), dst.ljust(16, b"\0"), 0, NOCOOKIE)


def _dump(sock: socket.socket, family: int, protocol: int, states: int) -> list[Listening]:
    size = 4 if family == socket.AF_INET else 16
    out = []
    for _type, body in dump(sock, SOCK_DIAG_BY_FAMILY, _request(family, protocol, states)):
        fam, _state, sport, _dport, src, _dst, *_rest = MSG.unpack_from(body)
        v6only = attrs(body[MSG.size:]).get(INET_DIAG_SKV6ONLY, b"\0")[:1] == b"\1"
        out.append(Listening(protocol, fam, bytes(src[:size]), socket.ntohs(sport), v6only))
    return out


def listening() -> list[Listening]:
    """Listening TCP and unconnected bound UDP sockets of this namespace, both families."""
    with open_socket(NETLINK_SOCK_DIAG) as sock:
        return [s for family in (socket.AF_INET, socket.AF_INET6)
                for protocol, states in ((TCP, TCP_LISTEN), (UDP, UDP_UNCONNECTED))
                for s in _dump(sock, family, protocol, states) if s.port]


def lookup_request(protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> bytes:
    """sock_diag request for the one socket of a conversation, as its owner sees it.

    TCP is looked up by the socket's own side (src = the client); UDP the
    other way round (src = the peer), as the kernel's udp_dump_one does.
    """
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    if protocol == UDP:
        src, sport, dst, dport = dst, dport, src, sport
    return message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1,
                   _request(family, protocol, ALL_STATES, sport, dport, src, dst))


def parse_answer(data: bytes) -> tuple[int, int] | None:
    """(uid, inode) from a sock_diag answer, or None (no such socket, or an error)."""
    for msg_type, _flags, _seq, body in messages(data):
        if msg_type != SOCK_DIAG_BY_FAMILY or len(body) < MSG.size:
            return None
        *_head, uid, inode = MSG.unpack_from(body)
        return uid, inode
    return None


def owner(sock: socket.socket, protocol: int, src: bytes, sport: int, dst: bytes, dport: int) -> tuple[int, int] | None:
    """(uid, inode) of a conversation's socket, asked over the sock_diag socket `sock`."""
    sock.send(lookup_request(protocol, src, sport, dst, dport))
    return parse_answer(sock.recv(1 << 12))


def tcp_socket(sock: socket.socket, local: bytes, local_port: int, remote: bytes, remote_port: int
               ) -> tuple[int, bytes] | None:
    """(state, cookie) of the TCP socket the kernel finds for local:local_port
    <-> remote:remote_port, or None. With no connection of that tuple that is
    the listening socket on local_port (state TCP_LISTEN). `sock`: a sock_diag socket."""
    family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
    sock.send(message(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1,
                      _request(family, TCP, ALL_STATES, local_port, remote_port, local, remote)))
    for msg_type, _flags, _seq, body in messages(sock.recv(1 << 12)):
        if msg_type == SOCK_DIAG_BY_FAMILY and len(body) >= MSG.size:
            return body[1], bytes(body[COOKIE])
        return None
    return None


def destroy_tcp(sock: socket.socket, local: bytes, local_port: int, remote: bytes, remote_port: int,
                cookie: bytes) -> None:
    """Close the TCP socket of that tuple now (one in TIME_WAIT simply goes), if
    it is still the one with `cookie`: never the listening socket the same
    tuple finds once it has gone. NetlinkError if the kernel refuses (ENOENT or
    ESTALE: not that socket; EOPNOTSUPP: no CONFIG_INET_DIAG_DESTROY)."""
    family = socket.AF_INET if len(local) == 4 else socket.AF_INET6
    body = bytearray(_request(family, TCP, ALL_STATES, local_port, remote_port, local, remote))
    body[REQ.size - 8:] = cookie
    request(sock, SOCK_DESTROY, bytes(body))
