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
from nftdivert.rewrite import with_dport, with_sport

Decide = Callable[[int, int], Divert | None]
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
    ) -> None:
        self.table = table
        self.decide = decide  # e.g. partial(decide.decide, listeners=..., ...)
        self.counters = counters if counters is not None else Counters()
        self.on_new = on_new
        self.last_error: Exception | None = None

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
        # A plain tuple hashes and compares equal to ConversationKey.
        key = (seg.protocol, seg.src, seg.sport, seg.dst)
        conv = table.get(key, now)
        if conv is not None:
            if conv.original_port == seg.dport and not (seg.is_syn and conv.closing_since is not None):
                return self._to_listener(data, seg, key, conv, now)
            # Same client port, other conversation: only an opener may replace
            # the mapping, or replies would get the wrong port back.
            if not seg.starts_conversation:
                self.counters.passed += 1
                return None
            table.remove(key)
        elif not seg.starts_conversation:
            # Mid-stream packet of a conversation we never diverted.
            self.counters.passed += 1
            return None

        divert = self.decide(seg.protocol, seg.dport)
        if divert is None:
            self.counters.passed += 1
            return None
        key = ConversationKey(*key)
        conv = Conversation(
            original_port=divert.original_port,
            listener_port=divert.listener_port,
            created=now,
            last_seen=now,
            indev=indev,
        )
        table.add(key, conv, now)
        self.counters.new_conversations += 1
        if self.on_new is not None:
            try:
                self.on_new(key, conv, seg)
            except Exception as exc:  # noqa: BLE001 - logging must not cost the packet
                self.counters.hook_errors += 1
                self.last_error = exc
        return self._to_listener(data, seg, key, conv, now)

    def _to_listener(self, data: bytes, seg: Segment, key: tuple, conv: Conversation, now: float) -> bytes:
        out = with_dport(data, seg, conv.listener_port)
        if seg.protocol == TCP and seg.is_fin_or_rst:
            self.table.mark_closing(key, now)
        self.counters.rewritten += 1
        return out

    def _outgoing(self, data: bytes, now: float) -> bytes | None:
        seg = parse(data)
        if type(seg) is not Segment:
            self._unfit(seg)
            return None
        # The client is the destination of a reply.
        conv = self.table.get((seg.protocol, seg.dst, seg.dport, seg.src), now)
        if conv is None or conv.listener_port != seg.sport:
            self.counters.passed += 1
            return None
        out = with_sport(data, seg, conv.original_port)
        if seg.protocol == TCP and seg.is_fin_or_rst:
            # The listener may close (or reset) first.
            self.table.mark_closing((seg.protocol, seg.dst, seg.dport, seg.src), now)
        self.counters.rewritten += 1
        return out
