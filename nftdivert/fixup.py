"""Per-packet pipeline between NetfilterQueue and the pure logic.

incoming: after NAT redirect, send a new conversation to an unbound port to
the default listener and keep its later packets going there.
outgoing: before conntrack (raw priority), give the listener's replies back
their original source port so conntrack matches its reply tuple.

Both return None (accept unchanged) or the new payload, and never raise: the
queue thread must survive anything and every packet must get a verdict.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nftdivert.conversations import Conversation, ConversationKey, ConversationTable
from nftdivert.decide import Divert
from nftdivert.packet import TCP, Segment, Unfit, parse
from nftdivert.rewrite import with_ports

Decide = Callable[[int, bytes, int], Divert | None]
OnNew = Callable[[ConversationKey, Conversation, Segment], None]


@dataclass(slots=True)
class Counters:
    """Each packet counts in `seen` and in exactly one of the next four."""

    seen: int = 0
    rewritten: int = 0
    passed: int = 0
    malformed: int = 0
    errors: int = 0
    new_conversations: int = 0
    hook_errors: int = 0  # on_new raised; the packet was still handled
    # New conversations whose client port was already taken at the listener
    # (the same client port towards another destination), so got an alias.
    port_clashes: int = 0
    unfit: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        self.table = table
        self.decide = decide  # e.g. partial(decide.decide, listeners=..., ...)
        self.counters = counters if counters is not None else Counters()
        self.on_new = on_new
        self.last_error: Exception | None = None
        # Conversations to an address of ours that is not a unicast one (a
        # broadcast): the listener answers from a unicast address the kernel
        # picks, so its replies are found by (protocol, client, client port).
        self.is_local = is_local
        self._elsewhere: dict[tuple, ConversationKey] = {}

    def incoming(self, data: bytes, now: float, *, indev: int = 0) -> bytes | None:
        """`indev` is only recorded on a new conversation, for its log line."""
        self.counters.seen += 1
        try:
            return self._incoming(data, now, indev)
        except Exception as exc:  # noqa: BLE001 - see module docstring
            self.counters.errors += 1
            self.last_error = exc
            return None

    def outgoing(self, data: bytes, now: float) -> bytes | None:
        self.counters.seen += 1
        try:
            return self._outgoing(data, now)
        except Exception as exc:  # noqa: BLE001
            self.counters.errors += 1
            self.last_error = exc
            return None

    def _unfit(self, unfit: Unfit) -> None:
        counters = self.counters
        counters.malformed += 1
        counters.unfit[unfit.reason] = counters.unfit.get(unfit.reason, 0) + 1

    def _incoming(self, data: bytes, now: float, indev: int) -> bytes | None:
        seg = parse(data)
        if type(seg) is not Segment:
            self._unfit(seg)
            return None
        table = self.table
        # After NAT the destination port is still the one the client asked for.
        key = (seg.protocol, seg.src, seg.sport, seg.dst, seg.dport)
        conv = table.get(key, now)
        if conv is not None and not (seg.is_syn and conv.closing_since is not None):
            return self._to_listener(data, seg, key, conv, now)
        if not seg.starts_conversation:
            # Mid-stream packet of a conversation we never diverted.
            self.counters.passed += 1
            return None

        divert = self.decide(seg.protocol, seg.dst, seg.dport)
        if divert is None:
            self.counters.passed += 1
            return None
        if conv is not None:
            table.remove(key)  # a new SYN on a closing conversation: start afresh
        key = ConversationKey(*key)
        alias = table.free_alias(key)
        if alias != seg.sport:
            self.counters.port_clashes += 1
        conv = Conversation(
            original_port=divert.original_port,
            listener_port=divert.listener_port,
            created=now,
            last_seen=now,
            indev=indev,
            alias_port=alias,
        )
        table.add(key, conv, now)
        if self.is_local is not None and not self.is_local(seg.dst):
            self._answered_from_elsewhere(key, conv)
        self.counters.new_conversations += 1
        if self.on_new is not None:
            try:
                self.on_new(key, conv, seg)
            except Exception as exc:  # noqa: BLE001 - logging must not cost the packet
                self.counters.hook_errors += 1
                self.last_error = exc
        return self._to_listener(data, seg, key, conv, now)

    def _to_listener(self, data: bytes, seg: Segment, key: tuple, conv: Conversation, now: float) -> bytes:
        out = with_ports(data, seg, conv.alias_port, conv.listener_port)
        if seg.protocol == TCP and seg.is_fin_or_rst:
            self.table.mark_closing(key, now)
        self.counters.rewritten += 1
        return out

    def _outgoing(self, data: bytes, now: float) -> bytes | None:
        seg = parse(data)
        if type(seg) is not Segment:
            self._unfit(seg)
            return None
        # A reply: the client is its destination, as the listener knows it.
        found = self.table.from_listener_side((seg.protocol, seg.dst, seg.dport, seg.src), now)
        if found is None and self._elsewhere:
            found = self._from_elsewhere((seg.protocol, seg.dst, seg.dport), now)
        if found is None or found[1].listener_port != seg.sport:
            self.counters.passed += 1
            return None
        key, conv = found
        out = with_ports(data, seg, conv.original_port, key[2])
        if seg.protocol == TCP and seg.is_fin_or_rst:
            # The listener may close (or reset) first.
            self.table.mark_closing(key, now)
        self.counters.rewritten += 1
        return out

    def _answered_from_elsewhere(self, key: ConversationKey, conv: Conversation) -> None:
        elsewhere = self._elsewhere
        elsewhere[(key[0], key[1], conv.alias_port)] = key
        if len(elsewhere) > self.table.max_entries:  # bounded like the table: the oldest goes
            del elsewhere[next(iter(elsewhere))]

    def _from_elsewhere(self, side: tuple, now: float) -> tuple[tuple, Conversation] | None:
        key = self._elsewhere.get(side)
        conv = self.table.get(key, now) if key is not None else None
        if conv is None or conv.alias_port != side[2]:
            self._elsewhere.pop(side, None)  # gone from the table since
            return None
        return key, conv
