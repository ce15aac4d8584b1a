"""Answers the analyst writes ([[custom]]): fixed bytes or a script, for the
default listeners' conversations whose original port, address and DNS name match.

Scripts are loaded once, in the listeners' process, when it starts, and run
on its loop: never in the packet path. An exception ends that conversation
(or that datagram's answer) only; its record carries the traceback's last
line. Every answer is logged as a `custom` record: the rule, the bytes each
way, the sha256 of the client's first message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import runpy
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

from nftdivert.config import CustomRule, HttpConfig

MAX_SEEN = 16384  # UDP client tuples whose datagrams are counted (for `when`), least recent forgotten


_loaded: dict[tuple[str, str], object] = {}  # (path, function) -> the function: each script runs once


def script(path: str, function: str):
    """The script's `function`, loaded on first use; OSError (one line) when it does not load."""
    key = (path, function)
    if key not in _loaded:
        try:
            found = runpy.run_path(path).get(function)
        except Exception as exc:  # anything the analyst's module does at import
            raise OSError(f"custom script {path} does not load: {last_line(exc)}") from None
        if not callable(found):
            raise OSError(f"custom script {path} defines no function {function}")
        _loaded[key] = found
    return _loaded[key]


def forget_scripts() -> None:
    """A reload reads every script again (the analyst may have edited them)."""
    _loaded.clear()


def last_line(exc: BaseException) -> str:
    return traceback.format_exception_only(exc)[-1].strip()


def _name_matches(name: str, pattern: str) -> bool:
    name, pattern = name.rstrip(".").lower(), pattern.rstrip(".").lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


class Rules:
    """The rules of one protocol, their answers made ready (files read, scripts loaded)."""

    def __init__(self, rules: tuple[CustomRule, ...], protocol: str, resolver=None) -> None:
        self._rules = [r for r in rules if r.protocol == protocol]
        self._answers = {r.name: r.payload() if r.script is None else script(r.script, protocol)
                         for r in self._rules}
        self._resolver = resolver  # the DNS listener's pool names the addresses; None without one
        self._seen: OrderedDict[tuple, int] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(self, original) -> tuple[CustomRule, str | None] | None:
        """The first rule for this original destination, and the name its address stands for."""
        if original is None or not self._rules:
            return None
        ip = ipaddress.ip_address(original[0].removeprefix("::ffff:"))
        name = self._resolver.name_for(ip) if self._resolver is not None else None
        for rule in self._rules:
            if rule.ports and not any(original[1] in r for r in rule.ports):
                continue
            if rule.hosts and not any(ip in net for net in rule.hosts):
                continue
            if rule.names and not (name and any(_name_matches(name, p) for p in rule.names)):
                continue
            return rule, name
        return None

    async def serve_tcp(self, matched, stream, base: dict, emit, first_bytes) -> None:
        """One TCP conversation by the rule; `first_bytes(read)`: what the client says first, a script's conn.first."""
        rule, name = matched
        answer = self._answers[rule.name]
        conn = Conn(stream, base, name)
        rec = dict(base, event="custom", rule=rule.name)
        try:
            if rule.script is not None:
                conn.first = await first_bytes(conn.recv)
                await answer(conn)
            else:
                await _fixed(rule.when, answer, conn)
        except Exception as exc:  # the script's, or the client's connection: this conversation only
            rec["error"] = last_line(exc)
        finally:
            emit(dict(rec, **conn.counts()))

    def answer_udp(self, matched, data: bytes, client, original, base: dict, emit) -> bytes | None:
        """One datagram's answer by the rule (None: none)."""
        rule, name = matched
        answer = self._answers[rule.name]
        count = self._count((client[0], client[1], original))
        rec = dict(base, event="custom", rule=rule.name, received=len(data), sha256=hashlib.sha256(data).hexdigest())
        reply = None
        try:
            if rule.script is not None:
                info = SimpleNamespace(client=base["client"], original=base["original_destination"], name=name, count=count)
                reply = answer(data, info)
                if reply is not None and not isinstance(reply, (bytes, bytearray)):
                    raise TypeError(f"udp() returned {type(reply).__name__}, not bytes or None")
            elif rule.when != "after_first_message" or count > 1:  # each datagram is a message of its own
                reply = answer
        except Exception as exc:
            rec["error"] = last_line(exc)
            reply = None
        emit(dict(rec, sent=len(reply) if reply is not None else 0))
        return bytes(reply) if reply is not None else None

    def _count(self, key: tuple) -> int:
        """How many datagrams this client tuple sent to this destination, this one included."""
        count = self._seen.pop(key, 0) + 1
        self._seen[key] = count
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        return count


@dataclass(frozen=True)
class Served:
    """What the default listeners answer a client with: its profile's [[custom]] rules and [http]."""

    tcp: Rules
    udp: Rules
    http: HttpConfig
    profile: str | None = None  # the profile's name; None: the top-level answers

    def fields(self) -> dict:
        """What a listener's record of this client says of its answers: the profile that gave them."""
        return {"profile": self.profile} if self.profile else {}


ServedFor = Callable[[str], Served]  # a client's address -> its answers


def serving(profiles, resolver=None) -> ServedFor:
    """Each profile's answers made ready (files read, scripts loaded: OSError if one does not load),
    found per client by its address."""
    by_name = {}
    for answers in (profiles.default, *profiles.answers.values()):
        for rule in answers.http.rules:
            if rule.script:
                script(rule.script, "http")
        by_name[answers.profile] = Served(Rules(answers.custom, "tcp", resolver), Rules(answers.custom, "udp", resolver),
                                          answers.http, answers.profile)
    if not profiles:
        return lambda _client: by_name[None]
    return lambda client: by_name[profiles.profile_for(client).profile]


async def _fixed(when: str, payload: bytes, conn: "Conn") -> None:
    if when == "first":
        await conn.send(payload)
    data = await conn.recv()
    messages = 0
    while data:
        messages += 1
        if when == "every_message" or (when == "after_first_message" and messages == 1):
            await conn.send(payload)
        data = await conn.recv()


class Conn:
    """What a TCP script's `tcp(conn)` gets: conn.first (the client's first bytes, b"" if it
    waited for the server), await conn.recv(n) (b"" at the client's end), await conn.send(data),
    conn.client and conn.original ("address:port"), conn.name (the DNS name asked, or None)."""

    def __init__(self, stream, base: dict, name: str | None) -> None:
        self._stream = stream
        self.first = b""
        self.client = base.get("client")
        self.original = base.get("original_destination")
        self.name = name
        self._sent = self._received = 0
        self._hash: str | None = None

    async def recv(self, n: int = 65536) -> bytes:
        data = await self._stream.read(n)
        self._received += len(data)
        if data and self._hash is None:
            self._hash = hashlib.sha256(data).hexdigest()
        return data

    async def send(self, data: bytes) -> None:
        self._stream.write(bytes(data))
        await self._stream.drain()
        self._sent += len(data)

    def counts(self) -> dict:
        counts = {"sent": self._sent, "received": self._received}
        if self._hash is not None:
            counts["sha256"] = self._hash
        return counts
