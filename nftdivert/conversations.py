"""Bounded table of diverted conversations: who was redirected from which port.

The incoming side needs it to keep rewriting a conversation consistently, the
outgoing side to put the original port back on the listener's replies.
Time is always passed in (monotonic seconds) so behaviour is reproducible.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from nftdivert.packet import TCP


class ConversationKey(NamedTuple):
    """A conversation as the client sees it, after NAT: the original port
    belongs in it, because a client may reuse one source port towards two
    destinations at once. Compares and hashes like the plain tuple."""

    protocol: int
    client_addr: bytes
    client_port: int
    local_addr: bytes
    original_port: int


class ListenerSide(NamedTuple):
    """The same conversation as the listener sees it (its replies carry this)."""

    protocol: int
    client_addr: bytes
    client_port: int  # the conversation's alias_port
    local_addr: bytes


@dataclass(slots=True)
class Conversation:
    """Mutable on purpose: last_seen is touched on every packet."""

    original_port: int
    listener_port: int
    created: float
    last_seen: float
    closing_since: float | None = None
    # The client port the listener sees. It equals the client's own port
    # unless that is already taken at the listener by another conversation
    # of the same client (same port, other destination): both would become
    # one socket there, so this one gets another port, and its replies get
    # the real one back.
    alias_port: int = 0
    # First-seen metadata, for logs; set by whoever creates the entry.
    indev: int = 0
    original_dst: bytes | None = None


@dataclass(frozen=True, slots=True)
class TableStats:
    size: int
    evicted_idle: int
    evicted_closed: int
    evicted_cap: int


class ConversationTable:
    """LRU-ordered: the front holds the least recently seen entry.

    That order makes both the size cap (drop the front) and idle expiry (scan
    from the front, stop at the first fresh entry) cheap. It relies on `now`
    never going backwards, as time.monotonic() guarantees.
    """

    def __init__(self, max_entries: int, tcp_idle: float, udp_idle: float, close_grace: float) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.tcp_idle = tcp_idle
        self.udp_idle = udp_idle
        self.close_grace = close_grace
        self._entries: OrderedDict[tuple, Conversation] = OrderedDict()
        self._by_listener_side: dict[tuple, tuple] = {}
        # Closing entries in the order they started closing, i.e. of deadline.
        self._closing: OrderedDict[tuple, float] = OrderedDict()
        self._evicted_idle = 0
        self._evicted_closed = 0
        self._evicted_cap = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, key: ConversationKey, conv: Conversation, now: float) -> None:
        """Insert or replace; the newest entry goes to the back.

        `conv.alias_port` 0 means the client's own port; use free_alias()
        first where that port may be taken at the listener.
        """
        if not conv.alias_port:
            conv.alias_port = key[2]
        self.remove(key)
        side = (key[0], key[1], conv.alias_port, key[3])
        clash = self._by_listener_side.get(side)
        if clash is not None:  # the caller did not check: the newcomer wins
            self.remove(clash)
        conv.last_seen = now
        self._entries[key] = conv
        self._by_listener_side[side] = key
        if conv.closing_since is not None:
            self._closing[key] = conv.closing_since
        while len(self._entries) > self.max_entries:
            self.remove(next(iter(self._entries)))
            self._evicted_cap += 1

    def free_alias(self, key: tuple) -> int:
        """The client port the listener should see for a new conversation `key`:
        the client's own if free there, else the next free one above it."""
        protocol, client, port, local = key[0], key[1], key[2], key[3]
        taken = self._by_listener_side
        candidate = port
        for _ in range(65536):
            if (protocol, client, candidate, local) not in taken:
                return candidate
            candidate = candidate + 1 if candidate < 65535 else 1024
        raise OverflowError("no free client port left at the listener for this client")

    def from_listener_side(self, side: tuple, now: float) -> tuple[tuple, Conversation] | None:
        """The conversation whose listener-side view is `side` (a reply's reversed ports)."""
        key = self._by_listener_side.get(side)
        if key is None:
            return None
        return key, self.get(key, now)

    def get(self, key: tuple, now: float) -> Conversation | None:
        conv = self._entries.get(key)
        if conv is not None:
            conv.last_seen = now
            self._entries.move_to_end(key)
        return conv

    def remove(self, key: tuple) -> Conversation | None:
        self._closing.pop(key, None)
        conv = self._entries.pop(key, None)
        if conv is not None:
            self._by_listener_side.pop((key[0], key[1], conv.alias_port, key[3]), None)
        return conv

    def mark_closing(self, key: tuple, now: float) -> None:
        """Start the grace period on the first FIN/RST; later ones don't extend it."""
        conv = self._entries.get(key)
        if conv is not None and conv.closing_since is None:
            conv.closing_since = now
            self._closing[key] = now

    def expire(self, now: float) -> int:
        """Evict closed-and-graced and idle entries; return how many."""
        evicted = 0
        closing = self._closing
        deadline = now - self.close_grace
        while closing:
            key, since = next(iter(closing.items()))
            if since > deadline:
                break
            self.remove(key)
            self._evicted_closed += 1
            evicted += 1

        tcp_cutoff = now - self.tcp_idle
        udp_cutoff = now - self.udp_idle
        oldest_cutoff = max(tcp_cutoff, udp_cutoff)
        stale = []
        for key, conv in self._entries.items():
            if conv.last_seen > oldest_cutoff:
                break  # everything behind is fresher still
            cutoff = tcp_cutoff if key[0] == TCP else udp_cutoff
            if conv.last_seen <= cutoff:
                stale.append(key)
        for key in stale:
            self.remove(key)
        self._evicted_idle += len(stale)
        return evicted + len(stale)

    @property
    def stats(self) -> TableStats:
        return TableStats(
            size=len(self._entries),
            evicted_idle=self._evicted_idle,
            evicted_closed=self._evicted_closed,
            evicted_cap=self._evicted_cap,
        )
