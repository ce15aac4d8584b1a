"""Clearing what answered a new conversation stale (see fixup.py): the edge
where FixUp's finding becomes a change in the kernel.

A listener socket in TIME_WAIT is closed (SOCK_DESTROY): the client's
retransmitted SYN then reaches the listener on the same tuple. Any other
socket belongs to a conversation still under way and is left alone; the new
conversation's conntrack entry is deleted instead, so that its retransmitted
SYN makes a new entry and the kernel chooses its client port again.
"""
from __future__ import annotations

from nftdivert.netlink import sock_diag
from nftdivert.netlink.codec import NETLINK_SOCK_DIAG, open_socket
from nftdivert.netlink.ctnetlink import Conntrack, Entry
from nftdivert.netlink.ipproto import TCP
from nftdivert.worker.packet import Segment

TIMEOUT = 1.0  # seconds: the worker's thread waits on this, rarely


class StaleClearer:
    """FixUp's `clear`: one sock_diag socket of its own, and the run's conntrack socket."""

    def __init__(self, conntrack: Conntrack) -> None:
        self.conntrack = conntrack
        self.diag = open_socket(NETLINK_SOCK_DIAG, timeout=TIMEOUT)

    def close(self) -> None:
        self.diag.close()

    def __call__(self, answer: Segment, entry: Entry, original_port: int) -> str | None:
        """`answer`: the listener's packet (its source the listener, its
        destination the client as the listener sees it); `entry`: the new
        conversation's, whose reply tuple is listener address:original_port ->
        that client port."""
        ends = (answer.src, answer.sport, answer.dst, answer.dport)
        found = sock_diag.tcp_socket(self.diag, *ends)
        if found is not None and found[0] == sock_diag.TCP_TIME_WAIT:
            try:  # by its cookie: if it has gone meanwhile, the tuple finds the listening socket
                sock_diag.destroy_tcp(self.diag, *ends, found[1])
                return "socket"
            except OSError:
                pass  # gone, or no SOCK_DESTROY in this kernel: let the kernel choose again
        if self.conntrack.delete(answer.version, TCP, answer.dst, answer.dport, answer.src, original_port, entry.id):
            return "entry"
        return None
