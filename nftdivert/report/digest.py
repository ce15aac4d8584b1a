"""A conversation log's records -> bounded tables for the report (pure).

Everything in a log is the sample's doing: names, URLs, headers, passwords.
So every value is taken defensively (a wrong type is shown as text, never
trusted), every string is cut to a length, and every table and tally keeps a
fixed number of rows and counts the rest: a log of millions of records costs
time in proportion and memory that does not grow.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice

ROWS = 500  # rows kept per table; the rest are counted
KEYS = 5000  # distinct destinations, names or SNIs tallied; the rest fold into one count
TIMELINE = 300  # conversations drawn on the timeline: the first to start
EXAMPLES = 5  # examples kept of each unknown kind of record
KINDS = 100  # unknown kinds of record counted by name
TEXT = 300  # characters of any one value shown

CONVERSATION = {"start", "end"}
SERVICE = {"dns", "dns_recycled", "tls", "http", "smtp", "smtp_auth", "pop3", "imap", "ftp", "ftp_upload", "ssh"}
LOGINS = {"smtp_auth", "pop3", "imap", "ftp"}
# What admission control or containment dropped: whatever such records are named.
DROP_WORDS = ("admission", "drop", "spoof", "contain")


# What HTML may not carry (controls, lone surrogates, noncharacters) or what would
# mislead a reader (bidirectional overrides: "exe.txt" shown for "txt.exe"):
# shown as \uXXXX instead.
_UNSHOWABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")


def text(value: object, limit: int = TEXT) -> str:
    """Any value as a bounded, showable string: strings as they are, the rest as compact JSON."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))[: limit + 1]
        except (TypeError, ValueError, RecursionError):
            value = "?"
    value = _UNSHOWABLE.sub(lambda m: f"\\u{ord(m[0]):04x}", value[: limit + 1])
    return value if len(value) <= limit else value[: limit - 1] + "…"


def number(value: object) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def when(value: object) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo is not None else None  # the schema's times are UTC, marked


def byte_count(value: object) -> int:
    """`sent` and `received` are {"packets", "bytes"} or null."""
    got = number(value.get("bytes")) if isinstance(value, dict) else None
    return int(got) if got is not None and got >= 0 else 0


def bump(counter: Counter, key: str) -> None:
    """Count `key` if it is counted already or there is room: a log may name a new one in every record."""
    if key in counter or len(counter) < KINDS:
        counter[key] += 1
    else:
        counter["(others)"] += 1


@dataclass
class Table:
    """The first `limit` rows, and how many more there were."""

    limit: int = ROWS
    rows: list[dict] = field(default_factory=list)
    more: int = 0

    def add(self, row: dict) -> None:
        if len(self.rows) < self.limit:
            self.rows.append(row)
        else:
            self.more += 1

    def __len__(self) -> int:
        return len(self.rows) + self.more


@dataclass
class Tally:
    """Counts per key for at most `limit` keys; later new keys are counted together."""

    limit: int = KEYS
    counts: dict = field(default_factory=dict)
    other_keys: int = 0
    other: Counter = field(default_factory=Counter)

    def add(self, key, **amounts: int) -> Counter | None:
        entry = self.counts.get(key)
        if entry is None:
            if len(self.counts) >= self.limit:
                self.other_keys += 1  # a key may be counted more than once here: the memory stays fixed
                self.other.update(amounts)
                return None
            entry = self.counts[key] = Counter()
        entry.update(amounts)
        return entry

    def busiest(self, by: str, rows: int = ROWS) -> list[tuple[object, Counter]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1][by], text(kv[0])))[:rows]


@dataclass
class Histogram:
    """Conversation starts per time bin, over the whole log. Past `limit` bins, the bins
    double in width (neighbours merged), so any span, however long, fits the same memory."""

    limit: int = 480
    width: int = 1  # seconds per bin
    bins: Counter = field(default_factory=Counter)  # start of the bin // width -> conversations

    def add(self, stamp: datetime) -> None:
        self.bins[int(stamp.timestamp()) // self.width] += 1
        while len(self.bins) > self.limit:
            self.width *= 2
            merged: Counter = Counter()
            for index, count in self.bins.items():
                merged[index // 2] += count
            self.bins = merged


@dataclass
class Digest:
    lines: int = 0
    unreadable: int = 0  # not UTF-8, not JSON, not an object, or too long
    malformed: int = 0  # an object whose fields are not what its event says
    first: datetime | None = None
    last: datetime | None = None
    events: Counter = field(default_factory=Counter)  # known kinds only
    versions: Counter = field(default_factory=Counter)  # these three: at most KINDS keys (bump)
    protocols: Counter = field(default_factory=Counter)
    destinations: Tally = field(default_factory=Tally)  # (name, address, port, protocol)
    firsts: dict = field(default_factory=dict)  # a tallied destination -> when it was first contacted
    clients: Tally = field(default_factory=Tally)
    conversations: Table = field(default_factory=Table)
    timeline: dict = field(default_factory=dict)  # conversation id -> row, the first TIMELINE started
    starts: Histogram = field(default_factory=Histogram)
    names: Tally = field(default_factory=Tally)  # DNS questions by name
    first_answers: dict = field(default_factory=dict)  # a tallied name -> types asked, first answer...
    recycled: Table = field(default_factory=Table)
    sni: Tally = field(default_factory=Tally)
    tls: Table = field(default_factory=Table)
    http: Table = field(default_factory=Table)
    mail: Table = field(default_factory=Table)
    uploads: Table = field(default_factory=Table)
    logins: Table = field(default_factory=Table)
    ssh: Table = field(default_factory=Table)
    dropped: Table = field(default_factory=Table)
    dropped_kinds: Counter = field(default_factory=Counter)
    unknown: Tally = field(default_factory=lambda: Tally(KINDS))
    examples: dict = field(default_factory=dict)  # unknown kind -> Table of EXAMPLES

    def add_line(self, line: bytes) -> None:
        self.lines += 1
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            self.unreadable += 1
            return
        if not isinstance(rec, dict):
            self.unreadable += 1
            return
        self.add(rec)

    def add(self, rec: dict) -> None:
        stamp = when(rec.get("time"))
        if stamp is not None:
            self.first = stamp if self.first is None else min(self.first, stamp)
            self.last = stamp if self.last is None else max(self.last, stamp)
        bump(self.versions, text(rec.get("v"), 10))
        event = rec.get("event")
        kind = text(event, 60) if event is not None else "(no event)"
        try:
            if not isinstance(event, str) or event not in CONVERSATION | SERVICE:
                self._other(kind, rec)
                return
            getattr(self, f"_{event}")(rec)
            self.events[event] += 1
        except (TypeError, ValueError, AttributeError, KeyError, IndexError):
            self.malformed += 1

    # ---- conversations
    def _row(self, rec: dict) -> dict:
        return {"time": text(rec.get("time"), 40), "client": text(rec.get("client")),
                "destination": text(rec.get("original_destination")), "name": text(rec.get("name")),
                "protocol": text(rec.get("protocol"), 20), "listener": text(rec.get("listener"), 60),
                "process": text((rec.get("process") or {}).get("command") if isinstance(rec.get("process"), dict)
                                else rec.get("process"))}

    def _key(self, rec: dict) -> tuple[str, str, str, str]:
        address, _, port = _split(text(rec.get("original_destination")))
        return text(rec.get("name")), address, port, text(rec.get("protocol"), 20)

    def _start(self, rec: dict) -> None:
        row = self._row(rec)
        bump(self.protocols, row["protocol"])
        if self.destinations.add(self._key(rec), conversations=1) is not None:  # tallied: so its first time too
            self.firsts.setdefault(self._key(rec), row["time"])
        self.clients.add(text(rec.get("client_address") or _split(row["client"])[0]), conversations=1)
        self.conversations.add(row)
        conv_id = rec.get("id")
        start = when(rec.get("time"))
        if start is not None:
            self.starts.add(start)
        if len(self.timeline) < TIMELINE and isinstance(conv_id, int) and start and conv_id not in self.timeline:
            self.timeline[conv_id] = {**row, "start": start, "end": None, "ended": ""}

    def _end(self, rec: dict) -> None:
        sent, received = byte_count(rec.get("sent")), byte_count(rec.get("received"))
        self.destinations.add(self._key(rec), bytes_sent=sent, bytes_received=received)
        self.clients.add(text(rec.get("client_address") or _split(text(rec.get("client")))[0]),
                         bytes_sent=sent, bytes_received=received)
        row = self.timeline.get(rec.get("id")) if isinstance(rec.get("id"), int) else None
        if row is not None:
            row.update(end=when(rec.get("time")), ended=text(rec.get("ended"), 20), sent=sent, received=received)

    # ---- what the listeners saw
    def _dns(self, rec: dict) -> None:
        name, qtype = text(rec.get("name"), 255), text(rec.get("type"), 20)
        if self.names.add(name, questions=1) is not None:
            first = self.first_answers.setdefault(name, {
                "types": [], "answer": text(rec.get("answer")), "rcode": text(rec.get("rcode"), 20),
                "client": text(rec.get("client"))})
            if qtype not in first["types"] and len(first["types"]) < 8:
                first["types"].append(qtype)

    def _dns_recycled(self, rec: dict) -> None:
        self.recycled.add({"time": text(rec.get("time"), 40), "address": text(rec.get("address")),
                           "old_name": text(rec.get("old_name")), "new_name": text(rec.get("new_name"))})

    def _tls(self, rec: dict) -> None:
        self.sni.add(text(rec.get("sni"), 255), handshakes=1)
        self.tls.add({**self._service(rec), "sni": text(rec.get("sni")),
                      "offered": text(rec.get("versions_offered")), "alpn": text(rec.get("alpn_offered")),
                      "result": text(rec.get("result"), 20), "version": text(rec.get("version"), 20),
                      "error": text(rec.get("error"))})

    def _http(self, rec: dict) -> None:
        self.http.add({**self._service(rec), "method": text(rec.get("method"), 20), "url": text(rec.get("url"), 500),
                       "status": text(rec.get("status"), 5), "size": number(rec.get("body_size")),
                       "sha256": text(rec.get("body_sha256"), 64), "saved": _path(rec.get("body_saved")),
                       "error": text(rec.get("error"))})

    def _smtp(self, rec: dict) -> None:
        self.mail.add({**self._service(rec), "from": text(rec.get("mail_from")), "to": text(rec.get("rcpt_to")),
                       "size": number(rec.get("size")), "sha256": text(rec.get("sha256"), 64),
                       "saved": _path(rec.get("saved")), "error": text(rec.get("save_error"))})

    def _ftp_upload(self, rec: dict) -> None:
        self.uploads.add({**self._service(rec), "file": text(rec.get("name")), "size": number(rec.get("size")),
                          "sha256": text(rec.get("sha256"), 64), "saved": _path(rec.get("saved")),
                          "error": text(rec.get("save_error"))})

    def _login(self, rec: dict) -> None:
        secret = rec.get("password", rec.get("apop_digest", rec.get("data")))
        self.logins.add({**self._service(rec), "kind": text(rec.get("event"), 20), "user": text(rec.get("user")),
                         "password": text(secret)})

    _smtp_auth = _pop3 = _imap = _ftp = _login

    def _ssh(self, rec: dict) -> None:
        self.ssh.add({**self._service(rec), "version": text(rec.get("client_version")),
                      "logins": text(rec.get("logins"))})

    def _service(self, rec: dict) -> dict:
        return {"time": text(rec.get("time"), 40), "client": text(rec.get("client")),
                "destination": text(rec.get("original_destination")), "name": text(rec.get("name"))}

    # ---- drops and what this version does not know
    def _other(self, kind: str, rec: dict) -> None:
        fields = [(text(k, 60), text(v)) for k, v in islice(rec.items(), 40) if k not in ("v", "time", "event")]
        row = {"time": text(rec.get("time"), 40), "kind": kind, "fields": fields}
        if any(word in kind.lower() for word in DROP_WORDS):
            bump(self.dropped_kinds, kind)
            self.dropped.add(row)
            return
        if self.unknown.add(kind, records=1) is not None:
            self.examples.setdefault(kind, Table(EXAMPLES)).add(row)


def _split(endpoint: str) -> tuple[str, str, str]:
    """'192.0.2.2:40000' / '[2001:db8::1]:53' / a bare address -> (address, ':', port)."""
    if endpoint.startswith("["):
        address, _, port = endpoint[1:].partition("]:")
        return address.rstrip("]"), ":", port
    if endpoint.count(":") == 1:
        return endpoint.partition(":")
    return endpoint, "", ""


def _path(value: object) -> str:
    return text(value, 4096) if isinstance(value, str) and len(value) <= 4096 else ""
