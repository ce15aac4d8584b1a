"""The capture's split per analysis: each task's own pcap, with its clients' packets only.

It runs in the capture's reader (capture.py), beside the run's own pcap:
every packet the reader writes there is also written to the pcap of the
task that owns its source or destination address at the packet's time
(tasks.TaskTable.owner). The run tells the reader over a pipe:
    ("table", TaskTable)       the table now
    ("open", task, path)       write task's packets to path from now on
    ("close", task)            close it; the reader answers ("closed", task, packets)
A close comes after what the kernel still held of the task's packets was
read (the reader drains its socket before it reads the pipe).
"""
from __future__ import annotations

from nftdivert.errors import say
from nftdivert.observers.pcap import PcapWriter
from nftdivert.tasks import TaskTable


def addresses(packet) -> tuple[bytes, bytes] | None:
    """(source, destination) of a raw IPv4 or IPv6 packet, or None if it is too short."""
    version = packet[0] >> 4 if len(packet) else 0
    if version == 4 and len(packet) >= 20:
        return bytes(packet[12:16]), bytes(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return bytes(packet[8:24]), bytes(packet[24:40])
    return None


class TaskSplit:
    def __init__(self) -> None:
        self.table = TaskTable()
        self.writers: dict[str, PcapWriter] = {}
        self._held: dict[bytes, TaskTable] = {}  # address -> the intervals holding it, for this table

    def handle(self, message: tuple, reply) -> None:
        kind = message[0]
        if kind == "table":
            self.table, self._held = message[1], {}
        elif kind == "open":
            _, task, path = message
            try:
                self.writers[task] = PcapWriter(path)
            except OSError as exc:  # the task goes on without its own pcap; the run's has every packet
                say(f"task {task}: cannot write its capture {path}: {exc.strerror or exc}")
        elif kind == "close":
            writer = self.writers.pop(message[1], None)
            packets = None
            if writer is not None:
                packets = writer.packets
                try:
                    writer.close()
                except OSError as exc:
                    say(f"task {message[1]}: its capture is incomplete: {exc.strerror or exc}")
            reply.send(("closed", message[1], packets))

    def write(self, packets: list) -> None:
        """(packet, time) each into the pcaps of the tasks that own its addresses then."""
        if not self.writers:
            return
        batches: dict[str, list] = {}
        for packet, stamp in packets:
            ends = addresses(packet)
            if ends is None:
                continue
            for address in set(ends):
                task = self._holding(address).owner(address, stamp)
                if task in self.writers:
                    batch = batches.setdefault(task, [])
                    if not batch or batch[-1][0] is not packet:  # a task's client talking to its own
                        batch.append((packet, stamp))
        for task, batch in batches.items():
            try:
                self.writers[task].write_many(batch)
            except OSError as exc:  # that task's pcap stops; the run's own has every packet
                say(f"task {task}: its capture stops here: {exc.strerror or exc}")
                self.writers.pop(task).close()

    def _holding(self, address: bytes) -> TaskTable:
        held = self._held.get(address)
        if held is None:
            if len(self._held) > 65536:  # a flood of sources: forget, look up again
                self._held.clear()
            held = self._held[address] = self.table.holding(address)
        return held

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
