"""Per-packet pipeline between NetfilterQueue and the pure logic.

incoming: after NAT redirect, send a new conversation to an unbound port to
the default listener and keep its later packets going there (its route).
outgoing: before conntrack (raw priority), give the listener's replies back
their original ports so conntrack matches its reply tuple. A reply to a
client port the table does not know belongs, in practice, to a conversation
whose client port the kernel remapped after the worker saw it (see
conversations.py); conntrack is asked which one.

The kernel chooses that port at random, and may choose one where a
listener socket of an earlier conversation still lingers in TIME_WAIT
(conntrack knows nothing of it: its reply tuples name the ports the clients
asked for, not the listener's). That socket then answers the new SYN with a
bare ACK of the old conversation: a stale answer. It is dropped, the socket
closed (or, if it is not one in TIME_WAIT, the new conversation's entry
deleted, so that the kernel chooses again), and the client's retransmitted
SYN is answered: one conversation, one second later, instead of a reset, a
retry and a conversation logged twice.

Both return None (accept unchanged), DROP, or the new payload, and never
raise: the queue thread must survive anything and every packet must get a verdict.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from nftdivert.netlink.ctnetlink import Entry
from nftdivert.worker.conversations import Conversation, ConversationTable, RouteKey
from nftdivert.worker.decide import Divert
from nftdivert.worker.packet import ACK, FIN, RST, SYN, TCP, UDP, Segment, Unfit, parse, parse_head
from nftdivert.worker.rewrite import with_ports

Decide = Callable[[int, bytes, int], Divert | None]
OnNew = Callable[[Conversation], None]
# (version, protocol, client, client_port, local, local_port) -> the conntrack
# entry whose reply tuple is local:local_port -> client:client_port.
Resolve = Callable[[int, int, bytes, int, bytes, int], Entry | None]
# (a stale answer, the new conversation's entry, its original port) -> what was
# cleared: "socket" (the lingering socket closed), "entry" (the entry deleted),
# or None (nothing could be).
Clear = Callable[[Segment, Entry, int], str | None]

DROP = b""  # the verdict for a packet that must not go on (compared by identity)

# How many of a client's original ports one unplaced reply may try (most
# recently used first: the right one is nearly always the first).
RESOLVE_TRIES = 16
# A reply conntrack could not place is not asked about again for this long.
UNPLACED_TTL = 1.0
UNPLACED_MAX = 4096
# How many of a client's original ports a suspected stale answer may try.
STALE_TRIES = 4


@dataclass(slots=True)
class Counters:
    """Each packet counts in `seen` and in exactly one of the next six."""

    seen: int = 0
    rewritten: int = 0
    passed: int = 0
    malformed: int = 0  # unfit and passed unchanged
    dropped: int = 0  # unfit and dropped: a truncated copy of diverted traffic
    errors: int = 0
    stale_answers: int = 0  # a lingering socket's answer to a new conversation: dropped (module docstring)
    new_conversations: int = 0
    hook_errors: int = 0  # on_new raised; the packet was still handled
    # New routes whose client port was already taken at the listener (the
    # same client port towards another port), so got an alias.
    port_clashes: int = 0
    # New conversations the kernel gave another client port (one client port
    # towards several addresses on one port), found through conntrack.
    kernel_remaps: int = 0
    # What was cleared after a stale answer: the lingering socket closed, or
    # the new conversation's entry deleted (the kernel then remaps it again).
    sockets_closed: int = 0
    entries_deleted: int = 0
    unfit: dict[str, int] = field(default_factory=dict)


class _Stale(Exception):
    """A stale answer was found and cleared: its packet is dropped."""


class FixUp:
    """Not thread-safe: serve both queues from one thread, or lock around calls."""

    def __init__(
        self,
        table: ConversationTable,
        decide: Decide,
        counters: Counters | None = None,
        *,
        on_new: OnNew | None = None,
        is_local: Callable[[bytes], bool] | None = None,
        resolve: Resolve | None = None,
        clear: Clear | None = None,
    ) -> None:
        self.table = table
        self.decide = decide  # e.g. partial(decide.decide, listeners=..., ...)
        self.counters = counters if counters is not None else Counters()
        self.on_new = on_new
        self.resolve = resolve
        self.clear = clear
        self.refusing = False  # the run is stopping by itself: a new conversation is dropped, not answered
        self.last_error: Exception | None = None
        # Conversations to an address of ours that is not a unicast one (a
        # broadcast): the listener answers from a unicast address the kernel
        # picks, so its replies are found by (protocol, client, client port).
        self.is_local = is_local
        self._elsewhere: dict[tuple, tuple] = {}
        self._unplaced: OrderedDict[tuple, float] = OrderedDict()

    # incoming() and outgoing() are what every queued packet costs: the common
    # case (a packet of a conversation already in the table) is kept to a few
    # calls, with the rarer work in helpers.

    def incoming(self, data: bytes, now: float, *, indev: int = 0) -> bytes | None:
        """`indev` is only recorded on a new conversation, for its log line."""
        counters = self.counters
        counters.seen += 1
        try:
            seg = parse(data)
            if type(seg) is not Segment:
                # Everything queued here is diverted. A truncated copy cannot be
                # rewritten, and passed on it would reach the unbound port and
                # draw a port-unreachable that ends the whole conversation;
                # dropped, it is lost like a datagram over a smaller MTU.
                return self._unfit(seg, seg.reason == "truncated")
            # After NAT the destination port is still the one the client asked for.
            key = (seg.protocol, seg.src, seg.sport, seg.dst, seg.dport)
            table = self.table
            route = table.route(key)
            if route is not None:
                conv = table.touch_route(key, route, now)
                flags = seg.tcp_flags  # 0 for UDP
                if conv is None or conv.closing_since is None or flags & (SYN | ACK) != SYN:
                    if conv is not None and flags & (FIN | RST):
                        # Only a route's one conversation can be told from a FIN
                        # here; shared routes close from the listener's side.
                        table.mark_closing(conv.binding, now)
                    counters.rewritten += 1
                    return with_ports(data, seg, route.alias_port, route.listener_port)
                # else a new SYN on the route's closing conversation: start afresh.
            return self._open(data, seg, key, now, indev)
        except Exception as exc:  # noqa: BLE001 - see module docstring
            counters.errors += 1
            self.last_error = exc
            return None

    def outgoing(self, data: bytes, now: float) -> bytes | None:
        counters = self.counters
        counters.seen += 1
        try:
            seg = parse(data)
            if type(seg) is not Segment:
                return self._unfit(seg, seg.reason == "truncated" and self._diverted(data))
            # A reply: the client is its destination, as the listener knows it.
            # (A plain tuple: it hashes and compares like the Binding it finds.)
            binding = (seg.protocol, seg.dst, seg.dport, seg.src)
            conv = self.table.from_listener_side(binding, now)
            if conv is None or conv.listener_port != seg.sport or conv.closing_since is not None:
                conv = self._reply_elsewhere(seg, binding, conv, now)
                if conv is None:
                    counters.passed += 1
                    return None
            if not conv.announced:
                self._announce(conv)
            flags = seg.tcp_flags  # 0 for UDP
            if flags & (FIN | RST):
                # The listener may close (or reset) first; closing first, its
                # socket stays in TIME_WAIT, on this binding.
                self.table.mark_closing(conv.binding, now, listener_fin=bool(flags & FIN))
            counters.rewritten += 1
            return with_ports(data, seg, conv.route[4], conv.reply_port)
        except _Stale:
            counters.stale_answers += 1
            return DROP
        except Exception as exc:  # noqa: BLE001
            counters.errors += 1
            self.last_error = exc
            return None

    def _unfit(self, unfit: Unfit, drop: bool) -> bytes | None:
        counters = self.counters
        counters.unfit[unfit.reason] = counters.unfit.get(unfit.reason, 0) + 1
        if drop:
            counters.dropped += 1
            return DROP
        counters.malformed += 1
        return None

    def _open(self, data: bytes, seg: Segment, key: tuple, now: float, indev: int) -> bytes | None:
        """An incoming packet no route takes: a new conversation, if it starts one and is diverted."""
        if not seg.starts_conversation:
            # Mid-stream packet of a conversation we never diverted.
            self.counters.passed += 1
            return None
        divert = self.decide(seg.protocol, seg.dst, seg.dport)
        if divert is None:
            self.counters.passed += 1
            return None
        if self.refusing:
            return DROP
        # New, or a new SYN on the route's closing conversation: start afresh.
        conv = self.table.open(RouteKey(*key), divert.listener_port, now, indev=indev)
        if conv.binding.client_port != seg.sport:
            self.counters.port_clashes += 1
        if self.is_local is not None and not self.is_local(seg.dst):
            self._answered_from_elsewhere(conv)
        if seg.protocol == UDP:
            # A TCP conversation is announced at its SYN/ACK: if the kernel
            # remaps this one, the listener never answers on this binding,
            # and the log must not ask conntrack about a port it gave away.
            self._announce(conv)
        self.counters.rewritten += 1
        return with_ports(data, seg, conv.binding.client_port, divert.listener_port)

    def _reply_elsewhere(self, seg: Segment, binding: tuple, conv: Conversation | None,
                         now: float) -> Conversation | None:
        """The conversation of a reply that the table does not hold at `binding`
        as an open conversation of this listener (`conv`: what it holds there)."""
        if conv is None and self._elsewhere:
            conv = self._from_elsewhere(binding[:3], now)
        if conv is None:
            return self._learn(seg, binding, (seg.dport,), now)
        if conv.listener_port != seg.sport:
            return None
        flags = seg.tcp_flags
        if conv.lingers and flags & (SYN | RST | FIN) == 0 and seg.protocol == TCP:
            # After its FIN a listener's socket sends one bare ACK (of the
            # client's FIN), then waits in TIME_WAIT. Another is its answer
            # to a retransmitted FIN, or to a SYN the kernel remapped here.
            conv.acks_after_fin += 1
            if conv.acks_after_fin > 1:
                self._stale_check(seg, binding)
        if conv.closing_since is not None and flags & (SYN | ACK) == SYN | ACK:
            # The listener accepts a new connection on a closing binding: the
            # client reopened it (conntrack's reply tuple names its own port),
            # or the kernel gave a new conversation's client this port (it
            # names this one); conntrack says which conversation it is.
            ports = (conv.reply_port,) if conv.reply_port == seg.dport else (conv.reply_port, seg.dport)
            return self._learn(seg, binding, ports, now, hint=conv.route[4]) or conv
        return conv

    def _learn(self, seg: Segment, binding: tuple, reply_ports: tuple[int, ...], now: float,
               hint: int | None = None) -> Conversation | None:
        """The conversation behind a reply: ask conntrack for the entry whose
        reply tuple is local:P -> client:R, for the client's recent original
        ports P and each of `reply_ports` R, and bind the one found to its route."""
        if self.resolve is None:
            return None
        unplaced = self._unplaced
        missed = unplaced.get(binding)
        if missed is not None and now - missed < UNPLACED_TTL:
            return None
        table = self.table
        ports = table.recent_ports(seg.protocol, seg.dst, seg.src, RESOLVE_TRIES)
        if hint is not None:
            ports = [hint, *(p for p in ports if p != hint)]
        if not ports:
            return None  # no route of this client: nothing to ask about
        # The listener accepting a connection: its entry has had no reply yet
        # (conntrack sees this one after us). One that has is an older
        # conversation's, in TIME_WAIT, from the client port the kernel has
        # just given the new one; bound to it, the SYN/ACK and every retry
        # would go to the old one.
        accepting = seg.tcp_flags & (SYN | ACK) == SYN | ACK
        for port in ports:
            for reply_port in reply_ports:
                entry = self.resolve(seg.version, seg.protocol, seg.dst, reply_port, seg.src, port)
                if entry is None or accepting and entry.seen_reply:
                    continue
                route_key = (seg.protocol, seg.dst, entry.src_port, seg.src, port)
                route = table.route(route_key)
                if route is None or route.listener_port != seg.sport:
                    return self._unplaced_now(binding, now)  # a conversation of the kernel's, not diverted
                if not entry.seen_reply and seg.tcp_flags & (SYN | RST) == 0 and seg.protocol == TCP:
                    # A new conversation's first answer must be a SYN/ACK (or a reset).
                    self._clear_stale(seg, binding, entry, port)
                conv = table.learn(binding, route_key, reply_port, now, original=(entry.dst, entry.dst_port))
                unplaced.pop(binding, None)
                if entry.seen_reply:
                    # Conntrack has seen this conversation answered before: one the
                    # table forgot (evicted, or closed but still talking), not new.
                    conv.announced = True
                elif reply_port != entry.src_port:
                    self.counters.kernel_remaps += 1
                return conv
        return self._unplaced_now(binding, now)

    def _stale_check(self, seg: Segment, binding: tuple) -> None:
        """Raise _Stale if this bare ACK of a listener socket that closed first
        answers a new conversation's SYN: conntrack holds an entry not yet
        answered whose reply goes to this binding."""
        if self.resolve is None:
            return
        table = self.table
        for port in table.recent_ports(seg.protocol, seg.dst, seg.src, STALE_TRIES):
            entry = self.resolve(seg.version, seg.protocol, seg.dst, seg.dport, seg.src, port)
            if entry is not None and not entry.seen_reply and \
                    table.route((seg.protocol, seg.dst, entry.src_port, seg.src, port)) is not None:
                self._clear_stale(seg, binding, entry, port)

    def _clear_stale(self, seg: Segment, binding: tuple, entry: Entry, port: int) -> None:
        """Clear what answered stale and raise _Stale (the packet is dropped);
        if nothing could be cleared, return: the packet goes on as before."""
        if self.clear is None:
            return
        try:
            cleared = self.clear(seg, entry, port)
        except Exception as exc:  # noqa: BLE001 - the packet still gets its verdict
            self.last_error = exc
            cleared = None
        if cleared == "socket":
            self.counters.sockets_closed += 1
            self.table.socket_gone(binding)
        elif cleared == "entry":
            self.counters.entries_deleted += 1
        else:
            return
        raise _Stale

    def _unplaced_now(self, binding: tuple, now: float) -> None:
        unplaced = self._unplaced
        unplaced[binding] = now
        unplaced.move_to_end(binding)
        if len(unplaced) > UNPLACED_MAX:
            unplaced.popitem(last=False)

    def _diverted(self, data: bytes) -> bool:
        """Is this truncated reply one of a diverted conversation? Then it must
        not pass unrestored: it would show the client the listener's port."""
        seg = parse_head(data)
        return type(seg) is Segment and (seg.protocol, seg.dst, seg.dport, seg.src) in self.table

    def _announce(self, conv: Conversation) -> None:
        conv.announced = True
        self.counters.new_conversations += 1
        if self.on_new is not None:
            try:
                self.on_new(conv)
            except Exception as exc:  # noqa: BLE001 - logging must not cost the packet
                self.counters.hook_errors += 1
                self.last_error = exc

    def _answered_from_elsewhere(self, conv: Conversation) -> None:
        elsewhere = self._elsewhere
        elsewhere[conv.binding[:3]] = conv.binding
        if len(elsewhere) > self.table.max_entries:  # bounded like the table: the oldest goes
            del elsewhere[next(iter(elsewhere))]

    def _from_elsewhere(self, side: tuple, now: float) -> Conversation | None:
        binding = self._elsewhere.get(side)
        conv = self.table.get(binding, now) if binding is not None else None
        if conv is None:
            self._elsewhere.pop(side, None)  # gone from the table since
        return conv
