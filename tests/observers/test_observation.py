"""The end of a run's observation: the log's last records, then the table of what was contacted."""

from __future__ import annotations

import io
import sys
import time
from types import SimpleNamespace

from nftdivert.observers.convlog import ConversationLog
from nftdivert.observers.observation import Observation
from nftdivert.observers.summary import Summary

END = {"v": 1, "time": "2027-01-15T08:00:03.750Z", "event": "end", "id": 7, "protocol": "udp",
       "client": "192.0.2.2:40000", "client_address": "192.0.2.2", "original_destination": "198.51.100.7:53",
       "listener": "udp-echo", "interface": "eth1", "duration": 3.5, "sent": {"packets": 1, "bytes": 84},
       "received": None, "ended": "open"}


class _Terminal(io.StringIO):
    """A slow terminal: what reaches it, in order, with the stderr it shares."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def write(self, text: str) -> int:
        time.sleep(0.001)  # a terminal that scrolls: the log thread is behind the reader
        self.seen.append(text)
        return len(text)


def test_the_table_comes_after_the_last_end_record(monkeypatch):
    seen: list[str] = []
    log = ConversationLog(_Terminal(seen), as_json=False)
    summary = Summary()
    for i in range(200):  # the ends the observer's stop made, all handed to the log at once
        rec = {**END, "id": i}
        summary.add(rec)
        log.put(rec)
    monkeypatch.setattr(sys, "stderr", _Terminal(seen))
    observation = Observation(None, None)
    observation.observer, observation.log = SimpleNamespace(summary=summary), log
    observation.report()
    log.close()
    table = next(i for i, text in enumerate(seen) if text.startswith("contacted:"))
    assert sum(" end " in text for text in seen[:table]) == 200, seen[table - 2:table + 2]
