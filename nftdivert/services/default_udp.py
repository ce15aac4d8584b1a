"""The default UDP answer: the port the client asked for chooses the service, else the echo.

A [[custom]] rule that matches the original destination answers first (custom.py).

NTP (123), Time (37), Daytime (13), Quote of the Day (17), Chargen (19),
Syslog (514, logged, no answer) and TFTP (69); every other port, and a
datagram whose original port is unknown, gets its own bytes back. The
listener asks its parent for the original destination (origin.py, with the
UDP protocol) once per client tuple: a conversation's datagrams all share
it, so the answer is kept while they keep coming.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from nftdivert.config import ServerFirstConfig, SmallServicesConfig
from nftdivert.services import clock, simple, syslog
from nftdivert.services.origin import Asked, client_fields, client_port, endpoint
from nftdivert.services.tftp import Tftp
from nftdivert.netlink.ipproto import UDP
from nftdivert.observers.flowid import of_sockets

KEEP = 10.0  # seconds an original destination is kept after the tuple's last datagram
MAX_KEPT = 16384
PORTS = {123: "ntp", 37: "time", 13: "daytime", 17: "qotd", 19: "chargen", 514: "syslog", 69: "tftp"}

Endpoint = tuple[str, int]
Origin = Callable[..., Awaitable["Asked | None"]]


class DefaultUdp:
    def __init__(self, name: str, emit, origin: Origin | None, small: SmallServicesConfig = SmallServicesConfig(),
                 first: ServerFirstConfig = ServerFirstConfig(), custom=None, served=None) -> None:
        self._name, self._emit, self._origin, self._small = name, emit or (lambda _rec: None), origin, small
        self._tftp = Tftp(self._emit, first.uploads_dir)
        self._kept: dict[tuple, tuple[Asked | None, float]] = {}
        self._quotes = 0
        self._custom = custom  # custom.Rules: the analyst's answers, by original destination; None: none
        self._served = served  # custom.ServedFor: a client's rules by its profile; None: the ones above for all

    def reload(self, served) -> None:
        """A reload's answers (custom.ServedFor): new datagrams get them."""
        self._served = served

    async def answer(self, data: bytes, client: tuple, local: Endpoint | None) -> bytes | None:
        original = await self._original(client, local)
        served = self._served(client[0].removeprefix("::ffff:")) if self._served is not None else None
        custom = served.udp if served is not None else self._custom
        matched = custom.match(original) if custom else None
        kind = PORTS.get(original[1]) if original is not None else None
        if matched is None and kind is None:
            return data  # the echo
        base = {**client_fields(client, original), **(served.fields() if served else {}), "listener": self._name,
                "original_destination": endpoint(original),
                "community_id": of_sockets(UDP, (client[0], client_port(client, original)), original)}
        if matched is not None:
            return custom.answer_udp(matched, data, client, original, base, self._emit)
        if kind == "tftp":
            return self._tftp.answer((client[:2], local), data, base)
        if kind == "syslog":
            self._emit(dict(base, event="syslog", **syslog.record(data)))
            return None
        now = clock.now(self._small.clock_offset)
        if kind == "ntp":
            reply = clock.ntp_answer(data, now)
            self._emit(dict(base, event="ntp", answered=reply is not None, **clock.ntp_fields(data)))
            return reply
        self._emit(dict(base, event=kind))
        if kind == "time":
            return clock.time_answer(now)
        if kind == "daytime":
            return clock.daytime_answer(now)
        if kind == "qotd":
            self._quotes += 1
            return simple.quote(self._quotes)
        return simple.chargen_datagram()

    async def _original(self, client: tuple, local: Endpoint | None) -> Asked | None:
        if self._origin is None or local is None:
            return None
        key = (client[0], client[1], local[0])
        now = time.monotonic()
        kept = self._kept.get(key)
        if kept is not None and kept[1] > now:
            self._kept[key] = (kept[0], now + KEEP)
            return kept[0]
        original = await self._origin(client[:2], local, UDP)
        if len(self._kept) >= MAX_KEPT:
            self._kept = {k: v for k, v in self._kept.items() if v[1] > now}
            if len(self._kept) >= MAX_KEPT:
                self._kept.clear()
        if original is not None:  # unknown is asked again: the parent may know it next time
            self._kept[key] = (original, now + KEEP)
        return original
