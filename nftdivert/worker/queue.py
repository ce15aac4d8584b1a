"""The queue worker: NetfilterQueue in, FixUp in the middle, verdicts out.

One thread serves both queues with epoll, so FixUp and the conversation
table need no lock. NetfilterQueue's own run(block=False) reads until the
socket is empty, which under a flood is never: one queue would starve the
other and the tick. So each turn takes at most DRAIN_BOUND packets from each
ready queue, and the tick (expiry, stats, bound ports) is checked between
turns. Every packet gets a verdict, whatever happens inside: `accept` (or
the one `drop` FixUp asks for) in a `finally`.

The callbacks are the hot path: every packet of every diverted conversation
passes them twice over netlink. The clock is read once per turn, not per
packet: a turn lasts milliseconds, conversations time out in seconds.
"""

from __future__ import annotations

import errno
import select
import socket
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from nftdivert.worker import decide as decide_mod
from nftdivert.config import Config
from nftdivert.errors import NftDivertError
from nftdivert.worker.conversations import ConversationTable
from nftdivert.worker.fixup import DROP, Clear, FixUp, Resolve
from nftdivert.netlink.ipproto import TCP, UDP
from nftdivert.netlink.nfqueue import drop_verdict, packet_id
from nftdivert.worker.pump import Pump

PROTOCOLS = {"tcp": TCP, "udp": UDP}
QUEUE_LENGTH = 1024
# Packets taken from one queue before the other queue and the tick get their
# turn: a flooded queue delays the other by a few milliseconds of work at
# most, and one epoll wait serves 64 packets.
DRAIN_BOUND = 64
KERNEL_QUEUES = Path("/proc/net/netfilter/nfnetlink_queue")
# NetfilterQueue has the kernel copy at most 4016 bytes of a packet (its own
# limit, and the ruleset's QUEUE_COPY_LIMIT) and receives into 4096 bytes,
# assuming at most 80 of metadata. The kernel may attach more: netlink and
# nfgenmsg headers 20, packet header 12, four interface indexes 32; mark,
# priority, skb info, classid and cap_len 8 each; hardware address 16;
# timestamp 20 (on every packet while any socket on the host asks for
# SO_TIMESTAMP, as `ping` does); the payload's header 4 and padding 3: 147
# bytes (uid/gid, conntrack and security context come only when asked for,
# and NetfilterQueue never asks). A message cut off at 4096 was never parsed
# and its packet waited forever, so the worker reads whole messages, of
# 4016 + 147 = 4163 bytes at most, into 8192.
RECEIVE_BUFFER = 8192


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.time)
    # Raised outside FixUp (reading or setting the payload); FixUp counts its own.
    verdict_errors: int = 0


def build_fixup(config: Config, is_bound: Callable[[int, bytes, int], bool], on_new=None,
                is_local: Callable[[bytes], bool] | None = None, resolve: Resolve | None = None,
                clear: Clear | None = None) -> FixUp:
    """The per-packet pipeline for `config`: decide() wired to its listeners and exemptions.

    `is_local(address)`: is it one of this host's unicast addresses (see FixUp).
    `resolve`: a conntrack lookup by reply tuple; `clear`: what clears a stale answer (see FixUp)."""
    listeners = {PROTOCOLS[p]: lst.port for p in PROTOCOLS if (lst := config.default_listener(p))}
    # One byte per port: a lookup per new conversation, however many ranges.
    alone = {TCP: bytearray(65536), UDP: bytearray(65536)}
    for protocol, ranges in ((TCP, config.leave_alone.tcp_ports), (UDP, config.leave_alone.udp_ports)):
        for r in ranges:
            alone[protocol][r.first:r.last + 1] = b"\1" * (r.last - r.first + 1)

    def left_alone(protocol: int, port: int) -> bool:
        return alone[protocol][port] == 1

    table = ConversationTable(config.worker.max_conversations, config.worker.tcp_idle,
                              config.worker.udp_idle, config.worker.close_grace)
    decide = partial(decide_mod.decide, listeners=listeners, is_bound=is_bound, left_alone=left_alone)
    return FixUp(table, decide, on_new=on_new, is_local=is_local, resolve=resolve, clear=clear)


class _BoundedSocket:
    """What NetfilterQueue.run_socket reads from: the queue's netlink socket,
    but at most `left` messages (one packet each), then EAGAIN, which ends
    run_socket's loop as an empty socket would.

    It reads each message whole (RECEIVE_BUFFER, not the size run_socket
    asks for). A message NetfilterQueue still does not deliver to the
    callback (cut off, or one it cannot parse) would hold its packet, and a
    slot of the queue, forever: its packet is dropped here and counted
    (`unreadable`)."""

    __slots__ = ("sock", "queue", "left", "buffer", "unseen", "unreadable")

    def __init__(self, fd: int, queue: int) -> None:
        self.sock = socket.fromfd(fd, socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: ours to close
        self.queue = queue
        self.left = 0
        self.buffer = memoryview(bytearray(RECEIVE_BUFFER))
        self.unseen: bytes | None = None  # the last message, until the callback has its packet
        self.unreadable = 0

    def recv(self, _size: int) -> bytes:
        self.settle()
        if self.left <= 0:
            raise BlockingIOError(errno.EAGAIN, "drain bound reached")
        self.left -= 1
        # MSG_TRUNC: the message's own length, even beyond the buffer.
        length = self.sock.recv_into(self.buffer, 0, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        message = self.buffer[:min(length, RECEIVE_BUFFER)].tobytes()
        self.unseen = message
        return message if length <= RECEIVE_BUFFER else b""  # a cut-off message: for settle() alone

    def seen(self) -> None:
        """The callback has the packet of the last message (and gives its verdict)."""
        self.unseen = None

    def settle(self) -> None:
        """Drop the packet of a message the callback never saw."""
        message, self.unseen = self.unseen, None
        if message is not None and (packet := packet_id(message)) is not None:
            self.unreadable += 1
            try:
                self.sock.send(drop_verdict(self.queue, packet))
            except OSError:
                pass  # the queue is gone: its packets with it

    def drain(self, nfq, bound: int) -> bool:
        """Handle up to `bound` packets; True if the bound was reached (more may wait)."""
        self.left = bound
        try:
            nfq.run_socket(self)
        finally:
            self.settle()
        return self.left <= 0


def kernel_queue_drops(numbers: dict[str, int], path: Path = KERNEL_QUEUES) -> dict[str, dict[str, int]]:
    """The kernel's own counters of our queues, in this network namespace:
    `queue_full` packets found the queue at its length, `socket_full` ones
    could not be handed to the worker's socket; `waiting` are queued now."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    by_number = {}
    for line in lines:
        cols = line.split()
        if len(cols) >= 7 and cols[0].isdigit():
            by_number[int(cols[0])] = {"waiting": int(cols[2]), "queue_full": int(cols[5]),
                                       "socket_full": int(cols[6])}
    return {key: {"queue": num, **by_number[num]} for key, num in numbers.items() if num in by_number}


def queue_names(index: int, workers: int) -> tuple[str, str]:
    """What the counters call worker `index`'s two queues: "incoming" alone, "incoming-1" among several."""
    return ("incoming", "outgoing") if workers <= 1 else (f"incoming-{index}", f"outgoing-{index}")


class Worker(Pump):
    """Binds the two queues (worker `index`'s, of `workers`) and pumps packets until stop() or a signal."""

    def __init__(self, config: Config, fixup: FixUp, *, pcap=None, tick: Callable[[float], None] | None = None,
                 tick_seconds: float = 1.0, index: int = 0, workers: int = 1) -> None:
        super().__init__(tick, tick_seconds)
        self.config = config
        self.fixup = fixup
        self.pcap = pcap
        self.stats = WorkerStats()
        self._queues: list = []
        self._now = time.monotonic()  # the clock as the current turn began
        names = queue_names(index, workers)
        self.numbers = {names[0]: config.queue.incoming + index, names[1]: config.queue.outgoing + index}

    # -- queue callbacks (the hot path) --------------------------------------

    def _callback(self, incoming: bool, reader: _BoundedSocket) -> Callable:
        """The callback of one queue: FixUp's verdict on each packet, given to the kernel."""
        fix = self.fixup.incoming if incoming else self.fixup.outgoing
        seen = reader.seen

        def callback(pkt) -> None:
            seen()
            drop = False
            try:
                data = pkt.get_payload()
                new = fix(data, self._now, indev=pkt.indev) if incoming else fix(data, self._now)
                if new is not None:
                    if new is DROP:
                        drop = True
                    else:
                        pkt.set_payload(new)
                        if self.pcap is not None:
                            self._capture(data, new)
            except Exception:  # noqa: BLE001 - the verdict below must still happen
                self.stats.verdict_errors += 1
            finally:
                if drop:
                    pkt.drop()
                else:
                    pkt.accept()
        return callback

    def _capture(self, data: bytes, new: bytes) -> None:
        wall = time.time()
        self.pcap.write(data, wall)  # as it arrived
        self.pcap.write(new, wall)  # as rewritten

    # -- lifecycle --------------------------------------------------------------

    def bind(self) -> None:
        """Attach to both queues (before the ruleset sends anything there)."""
        from netfilterqueue import NetfilterQueue

        for key, num in self.numbers.items():
            nfq = NetfilterQueue()
            reader = _BoundedSocket(nfq.get_fd(), num)
            with warnings.catch_warnings():
                # A smaller receive buffer than asked for (net.core.rmem_max) is fine.
                warnings.simplefilter("ignore", RuntimeWarning)
                try:
                    nfq.bind(num, self._callback(key.startswith("incoming"), reader), max_len=QUEUE_LENGTH)
                except OSError as exc:
                    reader.sock.close()
                    self.unbind()
                    which = key.split("-")[0]
                    raise NftDivertError(
                        f"cannot bind queue.{which} = {num} ({exc}): another program (another "
                        "nftdivert run?) holds it; stop that, or choose other numbers in [queue]") from None
            self._queues.append((nfq, reader))

    def kernel_drops(self) -> dict[str, dict[str, int]]:
        """Per queue ("incoming", "outgoing"): what the kernel dropped or holds, and
        what the worker dropped unread."""
        drops = kernel_queue_drops(self.numbers)
        unread = {reader.queue: reader.unreadable for _nfq, reader in self._queues}  # the worker's own drops
        return {key: {**counts, "unreadable": unread.get(counts["queue"], 0)} for key, counts in drops.items()}

    def counters(self) -> dict:
        """What this worker did, as the run's counters name it (summed over workers: add_counters)."""
        c = self.fixup.counters
        return {
            "packets": {"seen": c.seen, "rewritten": c.rewritten, "passed": c.passed,
                        "malformed": c.malformed, "dropped": c.dropped, "stale_answers": c.stale_answers,
                        "errors": c.errors + self.stats.verdict_errors, "hook_errors": c.hook_errors},
            "unfit": dict(c.unfit),
            "conversations": {"new": c.new_conversations, "client_port_clashes": c.port_clashes,
                              "kernel_remaps": c.kernel_remaps, "stale_sockets_closed": c.sockets_closed,
                              "stale_entries_deleted": c.entries_deleted, **asdict(self.fixup.table.stats)},
            "kernel": self.kernel_drops(),
        }

    def unbind(self) -> None:
        for nfq, reader in self._queues:
            try:
                nfq.unbind()
            except Exception:  # noqa: BLE001 - unbinding the rest matters more
                pass
            reader.sock.close()
        self._queues.clear()

    def close(self) -> None:
        """Unbind and release the stop pipe; the worker cannot run again."""
        self.unbind()
        super().close()

    def run(self) -> None:
        poll = select.epoll()
        queues = {}
        for nfq, reader in self._queues:
            queues[nfq.get_fd()] = (nfq, reader)
            poll.register(nfq.get_fd(), select.EPOLLIN)
        poll.register(self._stop_r, select.EPOLLIN)
        for fd in self._readers:
            poll.register(fd, select.EPOLLIN)
        stop = self._stop_r
        now = time.monotonic()
        next_tick = now + self.tick_seconds
        busy = False
        try:
            while True:
                # While a queue had more than one turn's worth, poll rather than wait.
                ready = poll.poll(0.0 if busy else max(0.0, next_tick - now))
                now = self._now = time.monotonic()  # the packets' time, for this turn
                busy = False
                for fd, _ in ready:
                    if fd == stop:
                        return
                    if fd in self._readers:
                        if not self._serve_reader(fd):  # that edge is gone: stop listening to it
                            poll.unregister(fd)
                        continue
                    nfq, reader = queues[fd]
                    busy |= reader.drain(nfq, DRAIN_BOUND)  # one turn, then the next queue
                if now >= next_tick:
                    next_tick = now + self.tick_seconds
                    self.fixup.table.expire(now)
                    if self.tick is not None:
                        self.tick(now)
        finally:
            poll.close()


def add_counters(total: dict, more: dict) -> dict:
    """`more`'s numbers added into `total`, at every depth (the workers' counters summed)."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_counters(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
    return total


def conntrack(stack: ExitStack):
    """A ctnetlink socket of its own (lookups of an entry by its reply tuple), or None."""
    try:
        from nftdivert.netlink.ctnetlink import Conntrack
        return stack.enter_context(Conntrack())
    except (ImportError, OSError):
        return None  # the log falls back to the packet as it arrived


def _as_the_sets_said(_protocol: int, _address: bytes, _port: int) -> bool:
    """The worker's is_bound: a queued conversation's port was unbound when the ruleset queued it."""
    return False


def queue_fixup(config: Config, stack: ExitStack, is_local) -> FixUp:
    """The queue path's FixUp, with conntrack to place kernel remaps and to
    clear what answers them stale (worker/stale.py)."""
    ct = conntrack(stack)
    clear = None
    if ct is not None:
        from nftdivert.worker.stale import StaleClearer
        try:
            clear = StaleClearer(ct)
        except OSError:
            pass  # no sock_diag: stale answers pass as they are
        else:
            stack.callback(clear.close)
    # What the ruleset queues, its bound sets found unbound, and it marked the
    # conversation queued (the log names the listener by that mark): the worker
    # must not overrule it with a view of the sockets refreshed since.
    return build_fixup(config, _as_the_sets_said, is_local=is_local, resolve=ct.entry if ct else None, clear=clear)
