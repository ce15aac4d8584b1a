"""The queue worker: NetfilterQueue in, FixUp in the middle, verdicts out.

One thread serves both queues with select(), so FixUp and the conversation
table need no lock and neither queue can starve the other for longer than
one drain (at most the queue's length, 1024 packets). Every packet gets a
verdict, whatever happens inside: `accept` (or the one `drop` FixUp asks
for) in a `finally`.
"""

from __future__ import annotations

import os
import selectors
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from . import decide as decide_mod
from .config import Config
from .errors import NftDivertError
from .conversations import Conversation, ConversationTable
from .convlog import NewConversation
from .fixup import DROP, FixUp, Resolve
from .packet import TCP, UDP

PROTOCOLS = {"tcp": TCP, "udp": UDP}
QUEUE_LENGTH = 1024


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.time)
    # Raised outside FixUp (reading or setting the payload); FixUp counts its own.
    verdict_errors: int = 0


def build_fixup(config: Config, is_bound: Callable[[int, int], bool], on_new=None,
                resolve: Resolve | None = None) -> FixUp:
    """The per-packet pipeline for `config`: decide() wired to its listeners and exemptions."""
    listeners = {PROTOCOLS[p]: lst.port for p in PROTOCOLS if (lst := config.default_listener(p))}
    ranges = {TCP: config.leave_alone.tcp_ports, UDP: config.leave_alone.udp_ports}

    def left_alone(protocol: int, port: int) -> bool:
        return any(port in r for r in ranges[protocol])

    table = ConversationTable(config.worker.max_conversations, config.worker.tcp_idle,
                              config.worker.udp_idle, config.worker.close_grace)
    decide = partial(decide_mod.decide, listeners=listeners, is_bound=is_bound, left_alone=left_alone)
    return FixUp(table, decide, on_new=on_new, resolve=resolve)


class Worker:
    """Binds the two queues and pumps packets until stop() or a signal."""

    def __init__(self, config: Config, fixup: FixUp, *, pcap=None, tick: Callable[[float], None] | None = None,
                 tick_seconds: float = 1.0) -> None:
        self.config = config
        self.fixup = fixup
        self.pcap = pcap
        self.tick = tick
        self.tick_seconds = tick_seconds
        self.stats = WorkerStats()
        self._queues: list = []
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)

    # -- queue callbacks (the hot path) --------------------------------------

    def _incoming(self, pkt) -> None:
        self._verdict(pkt, True)

    def _outgoing(self, pkt) -> None:
        self._verdict(pkt, False)

    def _verdict(self, pkt, incoming: bool) -> None:
        drop = False
        try:
            data = pkt.get_payload()
            now = time.monotonic()
            new = (self.fixup.incoming(data, now, indev=pkt.indev) if incoming
                   else self.fixup.outgoing(data, now))
            if new is DROP:
                drop = True
            elif new is not None:
                pkt.set_payload(new)
                if self.pcap is not None:
                    wall = time.time()
                    self.pcap.write(data, wall)  # as it arrived
                    self.pcap.write(new, wall)  # as rewritten
        except Exception:  # noqa: BLE001 - the verdict below must still happen
            self.stats.verdict_errors += 1
        finally:
            if drop:
                pkt.drop()
            else:
                pkt.accept()

    # -- lifecycle --------------------------------------------------------------

    def bind(self) -> None:
        """Attach to both queues (before the ruleset sends anything there)."""
        from netfilterqueue import NetfilterQueue

        for key, num, callback in (("incoming", self.config.queue.incoming, self._incoming),
                                   ("outgoing", self.config.queue.outgoing, self._outgoing)):
            nfq = NetfilterQueue()
            with warnings.catch_warnings():
                # A smaller receive buffer than asked for (net.core.rmem_max) is fine.
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    nfq.bind(num, callback, max_len=QUEUE_LENGTH)
                except OSError as exc:
                    self.unbind()
                    raise NftDivertError(
                        f"cannot bind queue.{key} = {num} ({exc}): another program (another "
                        "nftdivert run?) holds it; stop that, or choose other numbers in [queue]") from None
            self._queues.append(nfq)

    def unbind(self) -> None:
        for nfq in self._queues:
            try:
                nfq.unbind()
            except Exception:  # noqa: BLE001 - unbinding the rest matters more
                pass
        self._queues.clear()

    def close(self) -> None:
        """Unbind and release the stop pipe; the worker cannot run again."""
        self.unbind()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def stop(self) -> None:
        """Ask run() to return; safe from a signal handler or another thread."""
        try:
            os.write(self._stop_w, b"x")
        except OSError:  # full (a stop is pending anyway) or already closed
            pass

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for nfq in self._queues:
            sel.register(nfq.get_fd(), selectors.EVENT_READ, nfq)
        sel.register(self._stop_r, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + self.tick_seconds
        try:
            while True:
                timeout = max(0.0, next_tick - time.monotonic())
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        return
                    key.data.run(block=False)  # drain what is there, then back to select
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + self.tick_seconds
                    self.fixup.table.expire(now)
                    if self.tick is not None:
                        self.tick(now)
        finally:
            sel.close()


def new_conversation_event(config: Config, conv: Conversation) -> NewConversation:
    protocol, client, client_port, local, original_port = conv.route
    names = {lst.port: lst.name for lst in config.listeners if lst.protocol == ("tcp" if protocol == TCP else "udp")}
    return NewConversation(
        wall_time=time.time(), version=4 if len(client) == 4 else 6, protocol=protocol,
        client=client, client_port=client_port, local=local, original_port=original_port,
        listener_name=names.get(conv.listener_port, str(conv.listener_port)),
        listener_port=conv.listener_port, indev=conv.indev, original=conv.original)
