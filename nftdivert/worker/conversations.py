"""Bounded table of diverted conversations: routes on the way in, bindings on the way out.

The worker sees a client's packet at input priority -150: after the redirect
(dstnat) but before the kernel's source-NAT step at input (priority 100).
When one client port talks to two addresses on the same port, both
conversations would end in the same reply tuple, so at 100 the kernel gives
all but one of them another client port. At -150 they still look alike.

So the table keeps two things:
- a Route per tuple as the worker sees it on the way in (RouteKey): which
  listener port and which client port to write. Conversations that share a
  RouteKey share the route.
- a Conversation per tuple as the listener sees it (Binding), which is unique
  and which its replies carry: which ports to put back. A route lives while
  any conversation bound to it lives.
- the Bindings of TCP conversations gone from the table whose listener
  socket may still be there (lingering): the listener closed first, so its
  socket waits in TIME_WAIT. A new conversation from the same client port
  to another destination would land on that socket, which answers its SYN
  with a stale ACK of the old conversation; it gets an alias instead.

Time is always passed in (monotonic seconds) so behaviour is reproducible.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import NamedTuple

from nftdivert.netlink.ipproto import TCP

# Alias client ports come from here (the kernel's own NAT range for ports >= 1024).
ALIAS_FIRST, ALIAS_LAST = 1024, 65535
# How long a TCP socket that closed first stays in TIME_WAIT (Linux: TCP_TIMEWAIT_LEN, fixed).
TIME_WAIT = 60.0


class RouteKey(NamedTuple):
    """A conversation as the worker sees it on the incoming side, after the
    redirect: the original port belongs in it, because a client may use one
    source port towards several ports at once. Compares and hashes like the
    plain tuple."""

    protocol: int
    client_addr: bytes
    client_port: int
    local_addr: bytes
    original_port: int


class Binding(NamedTuple):
    """A conversation as the listener sees it (its replies carry this, reversed)."""

    protocol: int
    client_addr: bytes
    client_port: int  # the alias the worker wrote, or the port the kernel chose
    local_addr: bytes


@dataclass(slots=True)
class _Peer:
    """One client address towards one local address, per protocol."""

    # Original ports of its routes -> how many routes use each, most recently used last.
    ports: OrderedDict = field(default_factory=OrderedDict)
    cursor: int = 0  # the next alias port to try; 0: not used yet
    # Every alias port is taken: a new route fails at once, not after a scan
    # of all of them, until one of them is free again.
    full: bool = False


@dataclass(slots=True)
class Route:
    """How the incoming packets of a RouteKey are rewritten."""

    listener_port: int
    alias_port: int  # the client port written into them
    indev: int
    members: set = field(default_factory=set)  # the Bindings of its conversations
    peer: _Peer | None = None


@dataclass(slots=True)
class Conversation:
    """Mutable on purpose: last_seen is touched on every packet."""

    binding: Binding
    route: RouteKey
    listener_port: int
    # The destination port its replies get back: the port conntrack's reply
    # tuple expects. The client's own port, or the one the kernel gave it.
    reply_port: int
    created: float
    last_seen: float
    closing_since: float | None = None
    indev: int = 0
    # From conntrack when the conversation was learned there: (address, port)
    # the client asked for. None: the log asks conntrack itself.
    original: tuple[bytes, int] | None = None
    announced: bool = False  # its log line has been handed over
    # Its listener's socket may outlive it: the listener sent the first FIN
    # (TIME_WAIT follows), or it is forgotten before it closed.
    lingers: bool = False
    acks_after_fin: int = 0  # bare ACKs its listener sent after its FIN


@dataclass(frozen=True, slots=True)
class TableStats:
    size: int
    routes: int
    evicted_idle: int
    evicted_closed: int
    evicted_cap: int
    lingering: int = 0  # bindings kept from new conversations: a listener socket may linger there


class ConversationTable:
    """Conversations in LRU order: the front holds the least recently seen.

    That order makes both the size cap (drop the front) and idle expiry (scan
    from the front, stop at the first fresh entry) cheap. It relies on `now`
    never going backwards, as time.monotonic() guarantees. Routes and the
    per-client index only change when conversations come and go.
    """

    def __init__(self, max_entries: int, tcp_idle: float, udp_idle: float, close_grace: float) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.tcp_idle = tcp_idle
        self.udp_idle = udp_idle
        self.close_grace = close_grace
        self._entries: OrderedDict[Binding, Conversation] = OrderedDict()
        self._routes: dict[tuple, Route] = {}
        self._peers: dict[tuple, _Peer] = {}
        # Closing entries in the order they started closing, i.e. of deadline.
        self._closing: OrderedDict[Binding, float] = OrderedDict()
        # Bindings gone whose listener socket may linger -> until when; about
        # in order of that deadline; at most max_entries (the oldest go first).
        self._lingering: OrderedDict[Binding, float] = OrderedDict()
        self._expired_until = float("-inf")  # the last expire()'s now
        self._evicted_idle = 0
        self._evicted_closed = 0
        self._evicted_cap = 0
        # Candidate ports free_alias() looked at, in all: the work it did.
        self.alias_probes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, binding: object) -> bool:
        return binding in self._entries

    # -- routes (the incoming side) -------------------------------------------

    def route(self, key: tuple) -> Route | None:
        return self._routes.get(key)

    def touch_route(self, key: tuple, route: Route, now: float) -> Conversation | None:
        """An incoming packet went along `route`: its conversation, if the route
        has only one (the packet can be attributed), is touched and returned."""
        ports = route.peer.ports
        if len(ports) > 1:
            ports.move_to_end(key[4])  # for recent_ports(): a reply to it follows soon
        if len(route.members) != 1:
            return None
        (binding,) = route.members
        conv = self._entries.get(binding)  # get(), written out: every incoming packet comes here
        if conv is not None:
            conv.last_seen = now
            self._entries.move_to_end(binding)
        return conv

    def open(self, key: RouteKey, listener_port: int, now: float, *, indev: int = 0) -> Conversation:
        """A new route for `key` and the conversation that opened it, bound at
        the listener as the client's own port or, if another conversation of
        this client holds that there, a free alias."""
        self.remove_route(key)
        alias = self.free_alias(key)
        peer_key = (key[0], key[1], key[3])
        peer = self._peers.get(peer_key)
        if peer is None:
            peer = self._peers[peer_key] = _Peer()
        route = Route(listener_port=listener_port, alias_port=alias, indev=indev, peer=peer)
        self._routes[key] = route
        peer.ports[key[4]] = peer.ports.get(key[4], 0) + 1
        peer.ports.move_to_end(key[4])
        conv = Conversation(binding=Binding(key[0], key[1], alias, key[3]), route=key, listener_port=listener_port,
                            reply_port=key[2], created=now, last_seen=now, indev=indev)
        self._bind(conv, route, now)
        return conv

    def remove_route(self, key: tuple) -> None:
        route = self._routes.get(key)
        if route is not None:
            for binding in list(route.members):
                self.remove(binding)

    def free_alias(self, key: tuple) -> int:
        """The client port the listener should see for a new route `key`: the
        client's own if free there, else the next free one after the last alias
        given to this client (a cursor, so each new route costs O(1) amortized
        instead of a scan over every alias already taken). Free: no conversation
        holds it, and no listener socket may linger on it."""
        protocol, client, port, local = key[0], key[1], key[2], key[3]
        taken, lingering = self._entries, self._lingering
        self.alias_probes += 1
        if (protocol, client, port, local) not in taken and (protocol, client, port, local) not in lingering:
            return port
        peer = self._peers.get((protocol, client, local))
        if peer is not None and peer.full:
            raise OverflowError("no free client port left at the listener for this client")
        candidate = peer.cursor if peer is not None and peer.cursor else port
        for _ in range(ALIAS_LAST - ALIAS_FIRST + 1):
            candidate = candidate + 1 if ALIAS_FIRST <= candidate < ALIAS_LAST else ALIAS_FIRST
            self.alias_probes += 1
            binding = (protocol, client, candidate, local)
            if binding not in taken and binding not in lingering:
                if peer is not None:
                    peer.cursor = candidate
                return candidate
        if peer is not None:
            peer.full = True
        raise OverflowError("no free client port left at the listener for this client")

    def recent_ports(self, protocol: int, client: bytes, local: bytes, limit: int) -> list[int]:
        """Original ports of this client's routes to `local`, most recently used first."""
        peer = self._peers.get((protocol, client, local))
        return [] if peer is None else list(islice(reversed(peer.ports), limit))

    # -- conversations (the listener side) --------------------------------------

    def learn(self, binding: tuple, route_key: tuple, reply_port: int, now: float, *,
              original: tuple[bytes, int] | None = None) -> Conversation | None:
        """Bind a conversation found through conntrack to its route; it replaces
        whatever held `binding`. None if the route is gone."""
        route = self._routes.get(route_key)
        if route is None:
            return None
        binding = Binding(*binding)
        old = self._entries.get(binding)
        if old is not None and old.route == route_key:
            route.members.discard(binding)  # keeps the route alive through the swap
            self._closing.pop(binding, None)
            del self._entries[binding]
        elif old is not None:
            self.remove(binding)
        conv = Conversation(binding=binding, route=RouteKey(*route_key), listener_port=route.listener_port,
                            reply_port=reply_port, created=now, last_seen=now, indev=route.indev,
                            original=original)
        self._bind(conv, route, now)
        return conv

    def _bind(self, conv: Conversation, route: Route, now: float) -> None:
        conv.last_seen = now
        self._entries[conv.binding] = conv
        route.members.add(conv.binding)
        while len(self._entries) > self.max_entries:
            self.remove(next(iter(self._entries)))
            self._evicted_cap += 1

    def get(self, binding: tuple, now: float) -> Conversation | None:
        conv = self._entries.get(binding)
        if conv is not None:
            conv.last_seen = now
            self._entries.move_to_end(binding)
        return conv

    # The conversation a reply belongs to (the reply's reversed addresses and ports).
    from_listener_side = get

    def peek(self, binding: tuple) -> Conversation | None:
        """The conversation at `binding`, left where it is: for readers in other
        threads (one dict lookup, atomic under the GIL; nothing is reordered)."""
        return self._entries.get(binding)

    def remove(self, binding: tuple) -> Conversation | None:
        """Forget a conversation; its route goes with its last conversation."""
        self._closing.pop(binding, None)
        conv = self._entries.pop(binding, None)
        if conv is None:
            return None
        if binding[0] == TCP and (conv.lingers or conv.closing_since is None):
            self._linger(conv.binding, conv.last_seen + TIME_WAIT)
        else:
            self._freed(binding)
        key = conv.route
        route = self._routes.get(key)
        if route is not None:
            route.members.discard(binding)
            if not route.members:
                del self._routes[key]
                ports = route.peer.ports
                left = ports.get(key[4], 1) - 1
                if left:
                    ports[key[4]] = left
                else:
                    ports.pop(key[4], None)
                    if not ports:
                        self._peers.pop((key[0], key[1], key[3]), None)
        return conv

    def socket_gone(self, binding: tuple) -> None:
        """The listener's socket on `binding` was closed: nothing lingers there
        now, and a conversation still held there is forgotten."""
        self.remove(binding)  # which may leave it lingering: not any more
        if self._lingering.pop(binding, None) is not None:
            self._freed(binding)

    def _freed(self, binding: tuple) -> None:
        peer = self._peers.get((binding[0], binding[1], binding[3]))
        if peer is not None:
            peer.full = False  # its client port at the listener is free again

    def _linger(self, binding: Binding, until: float) -> None:
        if until <= self._expired_until:
            return  # idle for longer than TIME_WAIT already
        lingering = self._lingering
        lingering[binding] = until
        lingering.move_to_end(binding)
        if len(lingering) > self.max_entries:
            self._freed(lingering.popitem(last=False)[0])

    def mark_closing(self, binding: tuple, now: float, *, listener_fin: bool = False) -> None:
        """Start the grace period on the first FIN/RST; later ones don't extend it.
        `listener_fin`: the listener sent it, a FIN: its socket goes to TIME_WAIT."""
        conv = self._entries.get(binding)
        if conv is not None and conv.closing_since is None:
            conv.closing_since = now
            conv.lingers = listener_fin
            self._closing[binding] = now

    def expire(self, now: float) -> int:
        """Evict closed-and-graced and idle conversations; return how many."""
        evicted = 0
        self._expired_until = now
        closing = self._closing
        deadline = now - self.close_grace
        while closing:
            binding, since = next(iter(closing.items()))
            if since > deadline:
                break
            self.remove(binding)
            self._evicted_closed += 1
            evicted += 1

        tcp_cutoff = now - self.tcp_idle
        udp_cutoff = now - self.udp_idle
        oldest_cutoff = max(tcp_cutoff, udp_cutoff)
        stale = []
        for binding, conv in self._entries.items():
            if conv.last_seen > oldest_cutoff:
                break  # everything behind is fresher still
            cutoff = tcp_cutoff if binding[0] == TCP else udp_cutoff
            if conv.last_seen <= cutoff:
                stale.append(binding)
        for binding in stale:
            self.remove(binding)
        self._evicted_idle += len(stale)

        lingering = self._lingering
        while lingering:
            binding, until = next(iter(lingering.items()))
            if until > now:
                break
            del lingering[binding]
            self._freed(binding)
        return evicted + len(stale)

    @property
    def stats(self) -> TableStats:
        return TableStats(
            size=len(self._entries),
            routes=len(self._routes),
            lingering=len(self._lingering),
            evicted_idle=self._evicted_idle,
            evicted_closed=self._evicted_closed,
            evicted_cap=self._evicted_cap,
        )
