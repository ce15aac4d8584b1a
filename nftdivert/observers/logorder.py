"""The log's order: a conversation's `start` before the listeners' records of it (pure).

The start comes from conntrack through the observer's process, which runs
at nice 19 and so lags behind; a listener's record (a TLS handshake, an HTTP
request, a DNS question) comes from the listener's process and often
arrives first. So a listener's record waits here, until:
- a start with its `client` (and its `original_destination`, where the
  record names one) is written;
- or the observer writes a record stamped later than this one: the observer
  sends conntrack's events in order, so its start would have come first
  (a question to the diverter's own address never gets one);
- or HOLD_SECONDS pass, or more than HOLD_LIMIT records wait.
A record of a client whose start was written (and not yet ended) waits for
nothing of its own, only for the records before it.

The listener names the client as it saw it. Where the kernel gave the
conversation another client port at input NAT (its reply tuple was taken:
the same client port towards another address), the start says which in
`listener_client_port`; a listener's record that names that port and the
start's destination (a `dns` question names none: if a DNS listener
answered the conversation) is the conversation's: it gets the start's
`client`, and `listener_client_port` keeps what the listener saw. Only so
can the kernel path's TCP listener and the DNS listener know (they ask
nobody); where the listener's parent told it the client's own port (the
queue path, UDP), its record says so already and is left as it is.

A listener's record without a `community_id` (a DNS question: the DNS
listener does not ask what the client asked for) gets its start's, when
one live start has its `client`: once two have had it (one client port
towards two destinations) it could be either, so it gets none until both
have ended.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from nftdivert.observers.convrecords import split_endpoint

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
                 live_limit: int = LIVE_LIMIT, dns_listeners: frozenset[str] = frozenset()) -> None:
        self._hold, self._limit, self._live_limit = hold_seconds, limit, live_limit
        self._dns = dns_listeners  # a `dns` question names no destination: these listeners' conversations have it
        self._held: deque[tuple[float, dict]] = deque()  # (deadline, record), in arrival order
        # Held records by their `client`, in arrival order (a start that names it as the
        # listener's view of its client finds them).
        self._held_by: dict[str, deque[dict]] = {}
        # Conversations started, not ended: by client, and by (client, destination)
        self._live: OrderedDict[str, int] = OrderedDict()
        self._live_to: OrderedDict[tuple[str, str | None], int] = OrderedDict()
        # The client as the listener saw it -> (client, destination, listener, Community ID)
        # of each live conversation the kernel gave that port.
        self._aliases: OrderedDict[str, list[tuple[str, str, str, str | None]]] = OrderedDict()
        # client -> the Community ID of its one live start; None once two were live at once
        self._flows: OrderedDict[str, str | None] = OrderedDict()
        self._observed = ""  # the latest time of an observer's record

    @property
    def waiting(self) -> int:
        return len(self._held)

    def add(self, rec: dict, now: float) -> list[dict]:
        event, client = rec.get("event"), rec.get("client")
        if event not in ("start", "end") or "id" not in rec:  # a listener's
            if client is not None and not self._as_started(rec):
                self._held_by.setdefault(client, deque()).append(rec)
            self._held.append((now + self._hold, rec))
            return self.due(now)
        self._observed = max(self._observed, rec.get("time", ""))
        out = self.due(now)  # made before this conversation began
        out.append(rec)
        if event == "start":
            self._started(rec)
            out += self.due(now)  # its own
        else:
            self._ended(rec)
        return out

    def due(self, now: float) -> list[dict]:
        """The records that may go now, from the first on."""
        out = []
        while self._held and (len(self._held) > self._limit or self._may_go(*self._held[0], now)):
            rec = self._held.popleft()[1]
            self._unindex(rec)
            out.append(self._joined(rec))
        return out

    def _joined(self, rec: dict) -> dict:
        """The record, with its conversation's Community ID if it has none and one start says which."""
        flow = self._flows.get(rec.get("client"))
        if flow and "community_id" not in rec:
            return {**rec, "community_id": flow}
        return rec

    def wait(self, now: float) -> float | None:
        """Seconds until the first waiting record is due; None: none waits."""
        return max(0.0, self._held[0][0] - now) if self._held else None

    def flush(self) -> list[dict]:
        """Every waiting record (at the stop: no start comes any more)."""
        out = [rec for _deadline, rec in self._held]
        self._held.clear()
        self._held_by.clear()
        return out

    def _may_go(self, deadline: float, rec: dict, now: float) -> bool:
        client = rec.get("client")
        if client is None or rec.get("time", "") < self._observed or deadline <= now:
            return True
        # With a destination, only its own conversation's start: at a high rate the port the
        # kernel gave this one may well be another live conversation's own.
        return ((client, rec["original_destination"]) in self._live_to if "original_destination" in rec
                else client in self._live)

    def _as_started(self, rec: dict) -> bool:
        """Give a listener's record the client of the live conversation the kernel gave its
        client port, if it is one's: True if it names its client now (or nothing could)."""
        if "listener_client_port" in rec:
            return True  # its listener knew the client's own port
        if "original_destination" not in rec and rec.get("event") != "dns":
            return True  # nothing tells which conversation it is
        for client, destination, listener, flow in self._aliases.get(rec["client"], ()):
            if self._of(rec, destination, listener):
                own_client(rec, client, flow)
                return True
        return False

    def _of(self, rec: dict, destination: str, listener: str) -> bool:
        """Whether a listener's record of the port the listener saw is this conversation's."""
        asked = rec.get("original_destination")
        return asked == destination if asked is not None else listener in self._dns

    def _unindex(self, rec: dict) -> None:
        held = self._held_by.get(rec.get("client"))
        if held and held[0] is rec:  # records leave in the order they came
            held.popleft()
            if not held:
                del self._held_by[rec["client"]]

    def _started(self, rec: dict) -> None:
        client, destination = rec.get("client"), rec.get("original_destination")
        if client is None:
            return
        _count(self._live, client, 1, self._live_limit)
        _count(self._live_to, (client, destination), 1, self._live_limit)
        # A second live start of this client: which one a record belongs to is unknown until both end.
        self._flows[client] = rec.get("community_id") if self._live.get(client) == 1 else None
        self._flows.move_to_end(client)
        if len(self._flows) > self._live_limit:
            self._flows.popitem(last=False)
        seen = _seen(rec)
        if seen is None:
            return
        listener, flow = rec.get("listener", ""), rec.get("community_id")
        aliases = self._aliases.setdefault(seen, [])
        aliases.append((client, destination, listener, flow))
        self._aliases.move_to_end(seen)
        if len(self._aliases) > self._live_limit:
            self._aliases.popitem(last=False)
        held = self._held_by.pop(seen, None)
        if held:  # its listener's records, come before it
            left = deque()
            for waiting in held:
                if self._of(waiting, destination, listener):
                    own_client(waiting, client, flow)
                else:
                    left.append(waiting)
            if left:
                self._held_by[seen] = left

    def _ended(self, rec: dict) -> None:
        client, destination = rec.get("client"), rec.get("original_destination")
        _count(self._live, client, -1)
        _count(self._live_to, (client, destination), -1)
        if client not in self._live:
            self._flows.pop(client, None)
        seen = _seen(rec)
        aliases = self._aliases.get(seen) if seen is not None else None
        mine = (client, destination, rec.get("listener", ""), rec.get("community_id"))
        if aliases and mine in aliases:
            aliases.remove(mine)
            if not aliases:
                del self._aliases[seen]


def own_client(rec: dict, client: str, flow: str | None = None) -> None:
    """A listener's record, made to name its conversation's `client` (in place); the port
    the listener saw stays in `listener_client_port`, after the client's fields. The
    listener hashed its Community ID from the port it saw: the start's (`flow`) is the one."""
    seen = split_endpoint(rec["client"])[1]
    after = "client_address" if "client_address" in rec else "client"
    fields = list(rec.items())
    rec.clear()
    for key, value in fields:
        rec[key] = client if key == "client" else flow if key == "community_id" and flow else value
        if key == after:
            rec["listener_client_port"] = seen


def _seen(rec: dict) -> str | None:
    """The start's client as its listener sees it, when the kernel gave it another port."""
    port = rec.get("listener_client_port")
    if port is None:
        return None
    address = rec.get("client_address") or split_endpoint(rec["client"])[0]
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _count(live: OrderedDict, key, step: int, limit: int = 0) -> None:
    """Count a conversation in or out of `live` (the oldest key forgotten beyond `limit`)."""
    left = live.get(key, 0) + step
    if left <= 0:
        live.pop(key, None)
        return
    live[key] = left
    if step > 0:
        live.move_to_end(key)
        if len(live) > limit:
            live.popitem(last=False)
