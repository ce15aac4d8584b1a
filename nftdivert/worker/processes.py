"""Several queue workers, one process each: every core the host gives the run.

One Python process pumps one core at most (the interpreter lock), and the
queue path's work is per packet. With `queue.workers` above one, each worker
is a child of its own with its own two queues, conversation table and
conntrack sockets; the ruleset hashes each client address to one of them
(spread.py), so a worker sees both directions of all its conversations and
nothing is shared. The run's own process keeps the tick (bound ports,
bridges, counters), which then no longer stalls any packet.

Over one pipe each way the run asks a worker where a listener's conversation
was going (the listener's origin question, sent to the worker its client's
address hashes to), tells it to refuse new conversations (the run is failing
closed) or to report now; the worker answers, and sends its counters four times a
second. A worker dies with the run (lifeline.py), and the run stops when a
worker dies, as it does for the listeners.
"""

from __future__ import annotations

import ipaddress
import itertools
import multiprocessing
import signal
import time
from contextlib import ExitStack
from typing import Callable

from nftdivert.config import Config
from nftdivert.errors import NftDivertError
from nftdivert.process.child import READY, StartFailed, spawn, wait_ready
from nftdivert.ruleset import bound_sets
from nftdivert.worker import spread
from nftdivert.worker.queue import Worker, add_counters, conntrack, queue_fixup

REPORT_SECONDS = 0.25  # the counters `status` shows stay at most this much older than one worker's
# The origin question's answer: (table, conntrack lookup, client, local, protocol) -> Asked or None.
Original = Callable[..., object]
Reply = Callable[[object], None]


class WorkerProcesses:
    """The run's side of `count` worker processes."""

    def __init__(self, config: Config, count: int, original: Original) -> None:
        self.config, self.count, self._original = config, count, original
        self._children: list[tuple[multiprocessing.Process, object, object]] = []  # process, reports, control
        self._latest: list[dict] = []
        self._asked: dict[int, Reply] = {}
        self._ids = itertools.count(1)

    def start(self, timeout: float = 15.0) -> None:
        """Each worker up with its queues bound, or NftDivertError naming why not (and none left running)."""
        ctx = multiprocessing.get_context("fork")
        try:
            for index in range(self.count):
                control_r, control_w = ctx.Pipe(duplex=False)
                process, reports = spawn(f"nftdivert-worker-{index}", _serve, self.config, index, self.count,
                                         control_r, self._original)
                control_r.close()
                self._children.append((process, reports, control_w))
                self._latest.append({})
            for index, (process, reports, _control) in enumerate(self._children):
                wait_ready(f"queue worker {index}", reports, process.pid, timeout)
                if not reports.poll(timeout):  # its first counters follow READY: the run's are whole from the start
                    raise StartFailed(f"queue worker {index} (pid {process.pid}) sent no counters")
                self._latest[index] = reports.recv()[1]
        except (StartFailed, EOFError) as exc:
            self.stop()
            raise NftDivertError(str(exc)) from None

    @property
    def processes(self) -> list:
        return [process for process, _reports, _control in self._children]

    def serve(self, pump) -> None:
        """Read the workers' reports between the pump's turns."""
        for index, (_process, reports, _control) in enumerate(self._children):
            pump.add_reader(reports.fileno(), lambda index=index: self._read(index))

    def _read(self, index: int) -> bool:
        reports = self._children[index][1]
        try:
            while reports.poll(0):
                message = reports.recv()
                if message[0] == "answer":
                    reply = self._asked.pop(message[1], None)
                    if reply is not None:
                        reply(message[2])
                elif message[0] == "counters":
                    self._latest[index] = message[1]
        except (EOFError, OSError):
            return False  # its sentinel says how it ended
        return True

    def ask(self, client: tuple, local: tuple, protocol: int, reply: Reply) -> None:
        """A listener's origin question, to the worker that owns the client; `reply(answer)` once it answers."""
        try:
            address = ipaddress.ip_address(client[0].removeprefix("::ffff:")).packed
        except ValueError:
            reply(None)
            return
        ident = next(self._ids)
        self._asked[ident] = reply
        if len(self._asked) > 10_000:  # a worker that stopped answering: the listener has given up on those
            self._asked.pop(next(iter(self._asked)))
        self._send(spread.worker_for(address, self.count), ("ask", ident, client, local, protocol))

    def refuse(self) -> None:
        """Every worker drops new conversations from now on (the run fails closed)."""
        for index in range(len(self._children)):
            self._send(index, ("refuse",))

    def counters(self, fresh: bool = False, timeout: float = 2.0) -> dict:
        """The workers' counters summed; `fresh`: asked for now (at the stop), not their last report."""
        if fresh:
            waiting = set()
            for index in range(len(self._children)):
                self._latest[index] = {}
                if self._send(index, ("report",)):
                    waiting.add(index)
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                conns = {self._children[i][1]: i for i in waiting}
                for conn in multiprocessing.connection.wait(list(conns), max(0.0, deadline - time.monotonic())):
                    index = conns[conn]
                    if not self._read(index) or self._latest[index]:
                        waiting.discard(index)
        total: dict = {}
        for latest in self._latest:
            add_counters(total, latest)
        total.setdefault("kernel", {})
        total["worker_conversations"] = {str(index): latest.get("conversations", {}).get("new", 0)
                                         for index, latest in enumerate(self._latest)}
        return total

    def _send(self, index: int, message: tuple) -> bool:
        try:
            self._children[index][2].send(message)
            return True
        except (OSError, ValueError):
            return False  # gone: the run stops on its sentinel

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM each worker (it unbinds its queues and leaves), SIGKILL what has not left by `timeout`."""
        for process, _reports, _control in self._children:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process, reports, control in self._children:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
            for end in (reports, control):
                end.close()
        self._children.clear()


def _serve(conn, config: Config, index: int, count: int, control, original: Original) -> None:
    """Worker `index` of `count`, in its own process: bind, say ready (or why not), pump until SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the run's handler: until the worker pumps, just leave
    with ExitStack() as stack:
        addresses = [bound_sets.addresses()]
        fixup = queue_fixup(config, stack, lambda address: address in addresses[0].local)
        ct = conntrack(stack)  # the origin questions' own socket, as the run has on one worker
        entry = ct.entry if ct is not None else None
        due = [0.0]

        def report() -> None:
            try:
                conn.send(("counters", worker.counters()))
            except (OSError, ValueError):
                worker.stop()  # the run is gone

        def tick(now: float) -> None:
            try:
                addresses[0] = bound_sets.addresses()
            except OSError:
                pass  # the last view stands
            if now >= due[0]:
                due[0] = now + REPORT_SECONDS
                report()

        def commands() -> bool:
            try:
                while control.poll(0):
                    message = control.recv()
                    if message[0] == "ask":
                        _ident, client, local, protocol = message[1:]
                        try:
                            answer = original(fixup.table, entry, tuple(client), tuple(local), protocol)
                        except Exception:  # noqa: BLE001 - an unknown origin, not a dead worker
                            answer = None
                        conn.send(("answer", message[1], tuple(answer) if answer is not None else None))
                    elif message[0] == "refuse":
                        fixup.refusing = True
                    elif message[0] == "report":
                        report()
            except (EOFError, OSError, ValueError):
                worker.stop()  # the run is gone
                return False
            return True

        worker = Worker(config, fixup, tick=tick, tick_seconds=REPORT_SECONDS, index=index, workers=count)
        try:
            worker.bind()
        except NftDivertError as exc:
            conn.send(("error", str(exc)))
            return
        stack.callback(worker.close)
        signal.signal(signal.SIGTERM, lambda *_: worker.stop())
        worker.add_reader(control.fileno(), commands)
        conn.send(READY)
        report()
        worker.run()
        report()
