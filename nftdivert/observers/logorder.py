"""The log's order: a conversation's `start` before the listeners' records of it (pure).

The start comes from conntrack through the observer's process, which runs
at nice 19 and so lags behind; a listener's record (a TLS handshake, an HTTP
request, a DNS question) comes from the listener's process and often
arrives first. So a listener's record waits here, until:
- a start with its `client` is written (the address and port the listener
  saw: the start's `client`, unless the client port was changed on the way);
- or the observer writes a record stamped later than this one: the observer
  sends conntrack's events in order, so its start would have come first
  (a question to the diverter's own address never gets one);
- or HOLD_SECONDS pass, or more than HOLD_LIMIT records wait.
A record of a client whose start was written (and not yet ended) waits for
nothing of its own, only for the records before it.

A listener's record without a `community_id` (a DNS question: the DNS
listener does not ask what the client asked for) gets its start's, when
one live start has its `client`: once two have had it (one client port
towards two destinations) it could be either, so it gets none until both
have ended.
"""
from __future__ import annotations

from collections import OrderedDict, deque

HOLD_SECONDS = 3.0
HOLD_LIMIT = 1024
LIVE_LIMIT = 16384  # clients with a start written and no end yet, remembered (the oldest forgotten first)


class StartsFirst:
    """add(record, now) -> the records to write now, in order; due(now) and flush() release the waiting ones.

    The listeners' records keep their own order (a `dns_recycled` before the
    question that recycled the address): one that may go waits behind one
    that may not. `now` is a monotonic clock; the records' `time` fields are
    compared as the ISO strings they are (one format: they sort as the times do).
    """

    def __init__(self, hold_seconds: float = HOLD_SECONDS, limit: int = HOLD_LIMIT,
                 live_limit: int = LIVE_LIMIT) -> None:
        self._hold, self._limit, self._live_limit = hold_seconds, limit, live_limit
        self._held: deque[tuple[float, dict]] = deque()  # (deadline, record), in arrival order
        # client -> (conversations started, not ended; the Community ID of the latest)
        self._live: OrderedDict[str, tuple[int, str | None]] = OrderedDict()
        self._observed = ""  # the latest time of an observer's record

    @property
    def waiting(self) -> int:
        return len(self._held)

    def add(self, rec: dict, now: float) -> list[dict]:
        event, client = rec.get("event"), rec.get("client")
        if event not in ("start", "end") or "id" not in rec:  # a listener's
            self._held.append((now + self._hold, rec))
            return self.due(now)
        self._observed = max(self._observed, rec.get("time", ""))
        out = self.due(now)  # made before this conversation began
        out.append(rec)
        if event == "start":
            self._started(client, rec.get("community_id"))
            out += self.due(now)  # its own
        else:
            self._ended(client)
        return out

    def due(self, now: float) -> list[dict]:
        """The records that may go now, from the first on."""
        out = []
        while self._held and (len(self._held) > self._limit or self._may_go(*self._held[0], now)):
            out.append(self._joined(self._held.popleft()[1]))
        return out

    def _joined(self, rec: dict) -> dict:
        """The record, with its conversation's Community ID if it has none and one start says which."""
        live = self._live.get(rec.get("client"))
        if live is not None and live[1] and "community_id" not in rec:
            return {**rec, "community_id": live[1]}
        return rec

    def wait(self, now: float) -> float | None:
        """Seconds until the first waiting record is due; None: none waits."""
        return max(0.0, self._held[0][0] - now) if self._held else None

    def flush(self) -> list[dict]:
        """Every waiting record (at the stop: no start comes any more)."""
        out = [rec for _deadline, rec in self._held]
        self._held.clear()
        return out

    def _may_go(self, deadline: float, rec: dict, now: float) -> bool:
        client = rec.get("client")
        return (client is None or client in self._live or rec.get("time", "") < self._observed
                or deadline <= now)

    def _started(self, client: str | None, flow: str | None) -> None:
        if client is None:
            return
        started = self._live.get(client, (0, None))[0]
        # A second live start of this client: which one a record belongs to is unknown until both end.
        self._live[client] = (started + 1, flow if not started else None)
        self._live.move_to_end(client)
        if len(self._live) > self._live_limit:
            self._live.popitem(last=False)

    def _ended(self, client: str | None) -> None:
        left, flow = self._live.get(client, (0, None))
        if left > 1:
            self._live[client] = (left - 1, flow)
        else:
            self._live.pop(client, None)
