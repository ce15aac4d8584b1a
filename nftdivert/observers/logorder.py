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
A record of a client whose start was written (and not yet ended) waits for nothing.
"""
from __future__ import annotations

from collections import OrderedDict, deque

HOLD_SECONDS = 3.0
HOLD_LIMIT = 1024
LIVE_LIMIT = 16384  # clients with a start written and no end yet, remembered (the oldest forgotten first)


class _Held:
    __slots__ = ("rec", "deadline", "done")

    def __init__(self, rec: dict, deadline: float) -> None:
        self.rec, self.deadline, self.done = rec, deadline, False


class StartsFirst:
    """add(record, now) -> the records to write now, in order; due(now) and flush() release the waiting ones.

    `now` is a monotonic clock; the records' `time` fields are compared as
    the ISO strings they are (one format: they sort as the times do).
    """

    def __init__(self, hold_seconds: float = HOLD_SECONDS, limit: int = HOLD_LIMIT,
                 live_limit: int = LIVE_LIMIT) -> None:
        self._hold, self._limit, self._live_limit = hold_seconds, limit, live_limit
        self._held: deque[_Held] = deque()  # in arrival order, so in time order too
        self._by_client: dict[str, list[_Held]] = {}
        self._live: OrderedDict[str, int] = OrderedDict()  # client -> conversations started, not ended
        self.waiting = 0

    def add(self, rec: dict, now: float) -> list[dict]:
        event, client = rec.get("event"), rec.get("client")
        if event in ("start", "end") and "id" in rec:  # the observer's
            out = self._release_until(rec.get("time", ""))
            out.append(rec)
            if event == "start":
                self._started(client)
                out += self._release_client(client)
            else:
                self._ended(client)
            return out
        if client is None or client in self._live:
            return [rec]
        held = _Held(rec, now + self._hold)
        self._held.append(held)
        self._by_client.setdefault(client, []).append(held)
        self.waiting += 1
        return self._pop(1) if self.waiting > self._limit else []

    def due(self, now: float) -> list[dict]:
        """The records that waited long enough."""
        return self._pop(self._leading(lambda held: held.deadline <= now))

    def wait(self, now: float) -> float | None:
        """Seconds until the next record is due; None: none waits."""
        self._skip_done()
        return max(0.0, self._held[0].deadline - now) if self._held else None

    def flush(self) -> list[dict]:
        """Every waiting record (at the stop: no start comes any more)."""
        return self._pop(len(self._held))

    def _started(self, client: str | None) -> None:
        if client is None:
            return
        self._live[client] = self._live.get(client, 0) + 1
        self._live.move_to_end(client)
        if len(self._live) > self._live_limit:
            self._live.popitem(last=False)

    def _ended(self, client: str | None) -> None:
        left = self._live.get(client, 0) - 1
        if left > 0:
            self._live[client] = left
        else:
            self._live.pop(client, None)

    def _release_client(self, client: str | None) -> list[dict]:
        out = []
        for held in self._by_client.pop(client, ()):
            held.done = True
            self.waiting -= 1
            out.append(held.rec)
        return out

    def _release_until(self, stamp: str) -> list[dict]:
        """The records made before `stamp`, an observer's record's time."""
        return self._pop(self._leading(lambda held: held.rec.get("time", "") < stamp))

    def _leading(self, pred) -> int:
        """How many waiting records from the first on satisfy `pred` (they come in time order)."""
        n = 0
        for held in self._held:
            if held.done:
                continue
            if not pred(held):
                break
            n += 1
        return n

    def _pop(self, n: int) -> list[dict]:
        """The first `n` waiting records (done ones skipped over)."""
        out = []
        while len(out) < n and self._held:
            held = self._held.popleft()
            if held.done:
                continue
            held.done = True
            self.waiting -= 1
            waiting = self._by_client.get(held.rec.get("client"))
            if waiting is not None:
                waiting.remove(held)
                if not waiting:
                    del self._by_client[held.rec.get("client")]
            out.append(held.rec)
        return out

    def _skip_done(self) -> None:
        while self._held and self._held[0].done:
            self._held.popleft()
