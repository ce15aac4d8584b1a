"""The capture (-w): what the clients sent and got, as they saw it.

The table's capture chains (templates/ruleset.nft.j2) hand each packet of the
clients' conversations to one nflog group, once, with the addresses and
ports the client used: incoming before conntrack and NAT, replies after
their un-NAT. The kernel copies the packet into a batch for the group's
socket and lets it go on, so the capture never holds a packet.

A process of its own reads the group (nflog.py) and writes the pcap
(pcap.py: raw IP, so IPv4 and IPv6 share it): in the worker's process it
would compete for the interpreter lock on the worker's hot path. It is a
fork, started before any thread exists; it dies with the run (a SIGTERM,
so it still writes out what it holds), ignores a terminal's Ctrl-C (the
run stops it once the ruleset is gone). Over a pipe it says ready once the
file's header is written (a file that takes nothing fails the start, before
any packet is diverted), and its counts when it ends, or the error that
ended it: a capture that cannot be written stops the run.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import resource
import select
import signal
import socket
import time

from nftdivert.errors import NftDivertError
from nftdivert.process.child import READY, wait_ready
from nftdivert.process.lifeline import fork_child, how_it_ended
from nftdivert.netlink import nflog
from nftdivert.observers.pcap import FILE_MODE, PcapWriter
from nftdivert.observers.pcapsplit import TaskSplit

START_SECONDS = 10.0
STOP_TIMEOUT = 10.0
FLUSH_EVERY = 1.0  # seconds: how stale the file may be for a reader while the run goes on


def open_file(path: str) -> int:
    """The capture file, created or truncated, not inheritable by programs; raises OSError."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)


class NflogCapture:
    """Reads nflog `group` in a child process and writes the pcap to an open file descriptor."""

    def __init__(self, fd: int, group: int, path: str, split: bool = False) -> None:
        """`split`: also write each analysis's packets to its own pcap (pcapsplit.py)."""
        self.fd, self.group, self.path = fd, group, path
        self.pid: int | None = None
        self.sentinel: int | None = None
        self._report: int | None = None
        self._tasks, self._tasks_child = multiprocessing.Pipe() if split else (None, None)

    def start(self) -> None:
        """Bind the group here (a group another program reads is refused at once), then fork the reader."""
        try:
            sock = nflog.open_group(self.group)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno == errno.EPERM:  # the group has a reader already
                raise NftDivertError(f"nflog group {self.group} is read by another program in this network "
                                     "namespace: set worker.pcap_group to another") from None
            raise NftDivertError(f"cannot read nflog group {self.group} for the capture: "
                                 f"{exc.strerror or exc}") from None
        report_r, report_w = multiprocessing.Pipe(duplex=False)

        def child() -> int:
            report_r.close()
            if self._tasks is not None:
                self._tasks.close()
            return _read_and_write(sock, self.fd, report_w, self._tasks_child)

        pid = fork_child(child, signum=signal.SIGTERM)
        sock.close()
        os.close(self.fd)
        report_w.close()
        if self._tasks_child is not None:
            self._tasks_child.close()
        self.pid, self._report = pid, report_r
        self.sentinel = os.pidfd_open(pid)  # readable once the reader has ended: the run watches it
        try:  # the file's header is written: the file takes what it is given, at least for now
            wait_ready("the capture's reader", report_r, pid, START_SECONDS)
        except OSError as exc:
            self.stop()
            raise NftDivertError(f"cannot write the capture {self.path}: {exc}") from None

    def tell(self, *message) -> None:
        """To the reader's split per analysis (pcapsplit.py); a reader that has ended hears nothing."""
        try:
            self._tasks.send(message)
        except (OSError, ValueError):
            pass

    def close_task(self, task: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """Close the task's pcap once the reader has written what the kernel held; its packets, or None."""
        self.tell("close", task)
        try:
            while self._tasks.poll(timeout):
                kind, closed, packets = self._tasks.recv()
                if kind == "closed" and closed == task:
                    return packets
        except (EOFError, OSError, ValueError):
            pass
        return None

    def failed(self) -> str | None:
        """Why the capture ended while the run goes on, or None. Reaps the reader."""
        if self.pid is None:
            return None
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        ended = f"(pid {self.pid}) {how_it_ended(os.waitstatus_to_exitcode(status))}"
        self.pid = None
        return self._read_report().get("error") or f"the capture {self.path} stopped: its reader {ended}"

    def _close_sentinel(self) -> None:
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None

    def stop(self) -> dict:
        """Stop the reader once it has read what the kernel handed over; its counts, and `error` or None."""
        self._close_sentinel()
        if self._tasks is not None:
            self._tasks.close()
            self._tasks = None
        if self.pid is None:
            return {}
        pid, self.pid = self.pid, None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        return self._read_report() or {"error": f"the capture {self.path} ended without a word"}

    def _read_report(self) -> dict:
        if self._report is None:
            return {}
        report, self._report = self._report, None
        try:
            counts = report.recv() if report.poll() else {}
        except EOFError:  # it died before it could say (kill -9)
            counts = {}
        finally:
            report.close()
        if not isinstance(counts, dict):  # it failed to start: wait_ready read why
            return {}
        if counts.get("error"):
            counts["error"] = f"cannot write the capture {self.path}: {counts['error']}"
        return counts


def _read_and_write(sock, fd: int, report, tasks=None) -> int:
    """The child: ready once the file's header is written; then nflog batches into the pcap until
    SIGTERM, then the last of them; 0, or 1 on an error. `tasks`: the run's pipe to the split."""
    stopping = False
    split = TaskSplit()
    readers = [sock] if tasks is None else [sock, tasks]

    def stop(*_args) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    counts = {"packets": 0, "overruns": 0}
    buf = bytearray(nflog.MESSAGE_MAX)
    floor = 0.0
    try:
        writer = PcapWriter(fd=fd)
        writer.flush()
    except OSError as exc:
        report.send(("error", exc.strerror or str(exc)))
        return 1
    report.send(READY)
    try:
        sock.setblocking(False)
        flush_at = time.monotonic() + FLUSH_EVERY
        while True:
            last = stopping
            if last:  # the ruleset is gone; the kernel sends what it still holds within its flush timeout
                time.sleep(3 * nflog.FLUSH_TIMEOUT / 100)
            else:
                select.select(readers, [], [], 0.2)
            floor = _drain(sock, buf, writer, counts, floor, split)
            if last:
                break
            if tasks is not None and tasks.poll():
                try:
                    floor = _tell_split(tasks, split, sock, buf, writer, counts, floor)
                except EOFError:  # the run is stopping: no more tasks
                    tasks, readers = None, [sock]
            if time.monotonic() >= flush_at:
                writer.flush()
                split.flush()
                flush_at = time.monotonic() + FLUSH_EVERY
        writer.close()
        split.close()
        code = 0
    except OSError as exc:
        counts["error"] = exc.strerror or str(exc)
        code = 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counts["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    report.send(counts)
    return code


def _tell_split(tasks, split: TaskSplit, sock, buf: bytearray, writer: PcapWriter, counts: dict,
                floor: float) -> float:
    """The run's messages to the split; before a task's pcap closes, what the kernel still holds
    of its packets (a batch waits up to its flush timeout there) is read."""
    while tasks.poll():
        message = tasks.recv()
        if message[0] == "close":
            time.sleep(3 * nflog.FLUSH_TIMEOUT / 100)
            floor = _drain(sock, buf, writer, counts, floor, split)
        split.handle(message, tasks)
    return floor


def _drain(sock, buf: bytearray, writer: PcapWriter, counts: dict, floor: float,
           split: TaskSplit) -> float:
    """Everything the socket holds into the file; returns the time of the last packet written."""
    while True:
        try:
            size = sock.recv_into(buf, 0, socket.MSG_TRUNC)  # the whole length, even if the buffer was short
        except BlockingIOError:
            return floor
        except OSError as exc:
            if nflog.is_overrun(exc):
                counts["overruns"] += 1
                continue
            raise
        if size > len(buf):  # never from the kernel's own sizes; counted as lost if it happens
            counts["overruns"] += 1
            size = len(buf)
        packets = nflog.timed(nflog.batch(buf, size), time.time(), floor)
        if packets:
            writer.write_many(packets)  # before the next receive reuses the buffer
            split.write(packets)
            floor = packets[-1][1]
            counts["packets"] += len(packets)
