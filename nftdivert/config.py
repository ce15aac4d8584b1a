"""The configuration: one TOML file, validated into frozen dataclasses.

Every key has a safe default, so no file at all is a working config. Every
value that reaches the rendered ruleset is checked here, so nothing from the
config can smuggle nftables syntax into it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from nftdivert.errors import ConfigError

MODES = ("gateway", "local", "both")
# The queue backends, named here once: "nft" queues with nft's own statement,
# "xt" through iptables-nft's NFQUEUE; the ruleset's backend classes take these
# names. `auto` asks the kernel which one works.
NATIVE_QUEUE, XT_QUEUE = "nft", "xt"
QUEUE_BACKENDS = (NATIVE_QUEUE, XT_QUEUE)
BACKENDS = ("auto", *QUEUE_BACKENDS)
PROTOCOLS = ("tcp", "udp")
# One protocol on a fixed port, without recognition (TCP only).
PROTOCOL_KINDS = ("http", "https", "smtp", "ftp", "pop3", "imap", "ssh")
LISTENER_KINDS = ("echo", "dns", "external", *PROTOCOL_KINDS)
LOG_FORMATS = ("auto", "json", "text")
# The field names of JSON records: our own (docs/reference/log-schema.md) or Elastic Common Schema's.
LOG_SCHEMAS = ("nftdivert", "ecs")
# RFC 5424's facilities by their usual names (syslog.conf's).
SYSLOG_FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
                     "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, **{f"local{i}": 16 + i for i in range(8)}}
AFTER_STOP = ("keep", "remove")
# queue: the worker rewrites every packet of a diverted conversation (the
# -300 story); kernel: the dstnat rule rewrites the port itself.
DIVERT_PATHS = ("queue", "kernel")

# A config or ruleset larger than this is refused unread: no real one comes
# near it, and reading without a bound lets `-c /dev/zero` eat all memory.
MAX_INPUT_BYTES = 1024 * 1024
INPUT_WAIT = 5.0  # seconds a config or ruleset pipe may stay silent
# Far above what one worker handles (tens of thousands of packets a second).
MAX_ADMISSION_RATE = 1_000_000

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
_CGROUP_PART = re.compile(r"[A-Za-z0-9_.@:+-]{1,255}")
# Characters that would end a quoted string or start a new statement in nft.
_NFT_SYNTAX = set("\"'{};#\\\n\r\t ")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _check_type(key: str, value: object, kind: type | tuple[type, ...], what: str) -> None:
    # bool is an int in Python; a port of `true` is a mistake, not 1.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(key, value, f"must be {what}, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(key, value, f"must be {what}, not {type(value).__name__}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check_type(key, value, str, "a string")
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(choices)}")


def _check_port(key: str, value: int) -> None:
    _check_type(key, value, int, "an integer port")
    if not 1 <= value <= 65535:
        raise ConfigError(key, value, "ports are 1-65535")


def _check_seconds(key: str, value: float) -> None:
    _check_type(key, value, (int, float), "a number of seconds")
    if not 0 < value <= 86400 * 7:
        raise ConfigError(key, value, "must be more than 0 and at most a week")


def check_table_syntax(table: object, key: str = "table") -> None:
    """The syntax rule for nftdivert's table name; the whole check, nft's
    keywords included, is ruleset.kernel.check_table_name."""
    _check_type(key, table, str, "a string")
    assert isinstance(table, str)
    if not _TABLE_NAME.fullmatch(table):
        raise ConfigError(key, table, "table names are 1-32 letters, digits and '_', starting with a letter")


def listen_address(value: str) -> tuple[str, int]:
    """"127.0.0.1:9464" or "[::1]:9464" -> (address, port); ValueError says why not."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError('an address and a port, like "127.0.0.1:9464" or "[::1]:9464"')
    address = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    if address.is_unspecified:
        raise ValueError("a wildcard address would answer the clients too, on every address they ask for: "
                         "name the address to serve on (127.0.0.1, a management interface's)")
    return str(address), int(port)


def _check_parsed(key: str, value: str, parse, example: str) -> None:
    """A string `parse` takes ("" for none); its ValueError says why not."""
    _check_type(key, value, str, f"a string like {example}")
    if value:
        try:
            parse(value)
        except ValueError as exc:
            raise ConfigError(key, value, str(exc)) from None


def _check_path(key: str, value: str) -> None:
    _check_type(key, value, str, "a path string")
    if "\0" in value or "\n" in value:
        raise ConfigError(key, value, "a path cannot contain NUL or newline")


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    @classmethod
    def parse(cls, key: str, value: object) -> "PortRange":
        if isinstance(value, str):
            parts = value.split("-")
            # isascii: str.isdigit() also accepts "²", which int() refuses.
            if len(parts) not in (1, 2) or not all(p.isascii() and p.isdigit() for p in parts):
                raise ConfigError(key, value, 'must be a port or a range like "8000-8100"')
            nums = [int(p) for p in parts]
            first, last = nums[0], nums[-1]
        else:
            _check_type(key, value, int, 'a port or a range like "8000-8100"')
            first = last = value  # type: ignore[assignment]
        rng = cls(first, last)
        rng.validate(key, value)
        return rng

    def validate(self, key: str, value: object) -> None:
        for p in (self.first, self.last):
            if not 1 <= p <= 65535:
                raise ConfigError(key, value, "ports are 1-65535")
        if self.first > self.last:
            raise ConfigError(key, value, "inverted range: the first port is above the last")

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Listener:
    """A service that receives diverted conversations on `port`."""

    name: str
    protocol: str
    port: int
    # echo: a built-in echo service; dns: the built-in DNS responder (see
    # [dns]); external: another program listens, nftdivert only diverts to it;
    # http, https, smtp, ftp, pop3, imap, ssh: that protocol's answer, TCP only.
    kind: str = "echo"

    def validate(self, key: str) -> None:
        _check_type(f"{key}.name", self.name, str, "a string")
        if not _LISTENER_NAME.fullmatch(self.name):
            raise ConfigError(f"{key}.name", self.name,
                              "names are 1-32 letters, digits, '_', '.', '-', starting with a letter or digit")
        _check_choice(f"{key}.protocol", self.protocol, PROTOCOLS)
        _check_port(f"{key}.port", self.port)
        _check_choice(f"{key}.kind", self.kind, LISTENER_KINDS)
        if self.kind in PROTOCOL_KINDS and self.protocol != "tcp":
            raise ConfigError(f"{key}.kind", self.kind, f"{self.kind} is spoken over tcp; set protocol = \"tcp\"")


@dataclass(frozen=True)
class QueueConfig:
    backend: str = "auto"
    # Worker k (of `workers`) reads queues incoming + k and outgoing + k, so the
    # two ranges must not overlap: 64 apart by default, room for 64 workers.
    incoming: int = 0
    outgoing: int = 64
    # Queue workers (processes), each owning the client addresses the ruleset's
    # hash gives it (worker/spread.py); 0: one per CPU this run may use.
    workers: int = 0
    # xt backend with several workers: the nft table writes the worker's number
    # into these mark bits beside `mark`, and the iptables-nft rule of worker k
    # matches both (those rules cannot compute the hash).
    worker_mark: int = 0x3F000000
    # closed: with no worker attached diverted packets are dropped, so nothing
    # leaks to the real destination; open: they pass (the kernel's bypass).
    fail: str = "closed"
    # xt backend only: the nft table marks packets for the iptables-nft queue
    # rules with this bit, because those rules cannot see the table's sets.
    mark: int = 0x00D10000
    # The ruleset sets this conntrack mark bit on each conversation it queues,
    # so the rest of it reaches the worker (and its listener) even when a
    # service binds its port later.
    ct_mark: int = 0x00400000
    # Admission: new conversations per second from one client address (per
    # family) that may enter the incoming queue; the rest are dropped before
    # it, counted, and retransmitted by the client. A flood from one client
    # then cannot fill the queue and starve every other conversation. 0: no limit.
    new_tcp_per_source: int = 500
    new_udp_per_source: int = 2000
    # The nflog group the drop rule hands each dropped conversation's first
    # packet to, so the conversation log records the attempt.
    admission_group: int = 1338

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.backend", self.backend, BACKENDS)
        for name in ("new_tcp_per_source", "new_udp_per_source"):
            value = getattr(self, name)
            _check_type(f"{key}.{name}", value, int, "an integer number of new conversations per second")
            if not 0 <= value <= MAX_ADMISSION_RATE:
                raise ConfigError(f"{key}.{name}", value, f"must be 0 (no limit) to {MAX_ADMISSION_RATE}")
        for name in ("incoming", "outgoing"):
            value = getattr(self, name)
            _check_type(f"{key}.{name}", value, int, "an integer queue number")
            if not 0 <= value <= 65535:
                raise ConfigError(f"{key}.{name}", value, "queue numbers are 0-65535")
        if self.incoming == self.outgoing:
            raise ConfigError(f"{key}.outgoing", self.outgoing,
                              "must differ from queue.incoming: each direction needs its own queue")
        _check_type(f"{key}.workers", self.workers, int, "a number of queue workers (0: one per CPU)")
        if not 0 <= self.workers <= MAX_QUEUE_WORKERS:
            raise ConfigError(f"{key}.workers", self.workers, f"0 (one per CPU) to {MAX_QUEUE_WORKERS}")
        _check_type(f"{key}.worker_mark", self.worker_mark, int, "an integer bit mask")
        low = self.worker_mark & -self.worker_mark
        if not 0 < self.worker_mark <= 0xFFFFFFFF or (self.worker_mark + low) & self.worker_mark:
            raise ConfigError(f"{key}.worker_mark", self.worker_mark, "must be one run of set bits in 32")
        _check_type(f"{key}.admission_group", self.admission_group, int, "an integer nflog group")
        if not 0 <= self.admission_group <= 65535:
            raise ConfigError(f"{key}.admission_group", self.admission_group, "nflog groups are 0-65535")
        _check_choice(f"{key}.fail", self.fail, ("closed", "open"))
        _check_type(f"{key}.mark", self.mark, int, "an integer bit mask")
        if not 0 < self.mark <= 0xFFFFFFFF:
            raise ConfigError(f"{key}.mark", self.mark, "must be a non-zero 32-bit mask")
        _check_type(f"{key}.ct_mark", self.ct_mark, int, "an integer bit mask")
        if not 0 < self.ct_mark <= 0xFFFFFFFF:
            raise ConfigError(f"{key}.ct_mark", self.ct_mark, "must be a non-zero 32-bit mask")
        if self.worker_mark & self.mark:
            raise ConfigError(f"{key}.worker_mark", self.worker_mark,
                              f"shares bits with queue.mark ({self.mark:#x}): each marks something else")

    def worker_numbers(self, workers: int, key: str = "queue") -> None:
        """Refuse queue numbers or mark bits that `workers` workers cannot have."""
        for name in ("incoming", "outgoing"):
            first = getattr(self, name)
            if first + workers - 1 > 65535:
                raise ConfigError(f"{key}.{name}", first, f"{workers} workers need queues {first}-{first + workers - 1}, "
                                  "beyond 65535")
        if abs(self.incoming - self.outgoing) < workers:
            raise ConfigError(f"{key}.outgoing", self.outgoing,
                              f"{workers} workers take queues {self.incoming}-{self.incoming + workers - 1} "
                              f"(incoming) and {self.outgoing}-{self.outgoing + workers - 1} (outgoing): "
                              f"the two ranges must not overlap; set queue.outgoing {workers} or more away "
                              "from queue.incoming, or fewer queue.workers")
        room = self.worker_mark // (self.worker_mark & -self.worker_mark) + 1
        if workers > room:
            raise ConfigError(f"{key}.worker_mark", self.worker_mark, f"holds {room} worker numbers, not {workers}")


@dataclass(frozen=True)
class LeaveAlone:
    """Traffic nftdivert never touches."""

    tcp_ports: tuple[PortRange, ...] = ()
    udp_ports: tuple[PortRange, ...] = ()
    hosts: tuple[Network, ...] = ()
    # local mode: this host's own traffic from these goes out untouched.
    users: tuple[str | int, ...] = ()
    groups: tuple[str | int, ...] = ()
    cgroups: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        for name in ("users", "groups"):
            for i, who in enumerate(getattr(self, name)):
                k = f"{key}.{name}[{i}]"
                _check_type(k, who, (str, int), "a name or a numeric id")
                if isinstance(who, int) and not 0 <= who <= 0xFFFFFFFE:
                    raise ConfigError(k, who, "ids are 0-4294967294")
                if isinstance(who, str) and not _USER_NAME.fullmatch(who):
                    raise ConfigError(k, who, "not a valid user or group name")
        for i, path in enumerate(self.cgroups):
            k = f"{key}.cgroups[{i}]"
            _check_type(k, path, str, "a cgroup v2 path string")
            parts = path.strip("/").split("/")
            if not path.strip("/") or not all(_CGROUP_PART.fullmatch(p) and p not in (".", "..") for p in parts):
                raise ConfigError(k, path, 'must be a cgroup v2 path like "system.slice/sshd.service"')


@dataclass(frozen=True)
class WorkerConfig:
    max_conversations: int = 65536
    tcp_idle: float = 300.0
    udp_idle: float = 60.0
    # How long a TCP conversation outlives its FIN/RST, for the last ACKs.
    close_grace: float = 10.0
    log: str = "-"  # "-" is stdout, "" turns the conversation log off
    log_format: str = "auto"  # auto: text on a terminal, JSON Lines elsewhere
    log_schema: str = "nftdivert"  # the field names of JSON records (the file's, the collector's): ours or "ecs"
    pcap: str = ""  # what the clients sent and got, as they saw it (nflog, before NAT)
    # The nflog group that capture reads; nflog groups are per network namespace,
    # and a group another program already reads is refused, so captures never mix.
    pcap_group: int = 1337
    pcap_rewritten: str = ""  # the queue worker's view: each diverted packet as it arrived and as rewritten
    # The counters `status` shows, in Prometheus's text format, rewritten with them (about once a second).
    metrics_file: str = ""
    metrics_listen: str = ""  # "127.0.0.1:9464": the same counters over HTTP (GET /metrics); "" none
    # The ruleset sets this conntrack mark bit on every conversation it
    # answers; the conversation log reads only entries that carry it.
    ct_mark: int = 0x00200000

    def validate(self, key: str) -> None:
        _check_type(f"{key}.max_conversations", self.max_conversations, int, "an integer")
        if not 16 <= self.max_conversations <= 10_000_000:
            raise ConfigError(f"{key}.max_conversations", self.max_conversations, "must be 16-10000000")
        for name in ("tcp_idle", "udp_idle", "close_grace"):
            _check_seconds(f"{key}.{name}", getattr(self, name))
        _check_path(f"{key}.log", self.log)
        _check_choice(f"{key}.log_format", self.log_format, LOG_FORMATS)
        _check_choice(f"{key}.log_schema", self.log_schema, LOG_SCHEMAS)
        _check_path(f"{key}.pcap", self.pcap)
        _check_type(f"{key}.pcap_group", self.pcap_group, int, "an integer nflog group")
        if not 0 <= self.pcap_group <= 65535:
            raise ConfigError(f"{key}.pcap_group", self.pcap_group, "nflog groups are 0-65535")
        _check_path(f"{key}.pcap_rewritten", self.pcap_rewritten)
        _check_path(f"{key}.metrics_file", self.metrics_file)
        _check_parsed(f"{key}.metrics_listen", self.metrics_listen, listen_address, '"127.0.0.1:9464"')
        if self.pcap and self.pcap == self.pcap_rewritten:
            raise ConfigError(f"{key}.pcap_rewritten", self.pcap_rewritten, "must differ from worker.pcap")
        _check_type(f"{key}.ct_mark", self.ct_mark, int, "an integer bit mask")
        if not 0 < self.ct_mark <= 0xFFFFFFFF:
            raise ConfigError(f"{key}.ct_mark", self.ct_mark, "must be a non-zero 32-bit mask")


_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
MAX_SYSLOG_BUFFER = 10_000_000


def collector_address(value: str) -> tuple[str, int]:
    """"collector.example:6514", "192.0.2.9:514" or "[2001:db8::9]:514" -> (host, port); ValueError says why not."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError('a host and a port, like "collector.example:6514", "192.0.2.9:514" or "[2001:db8::9]:514"')
    if host.startswith("[") and host.endswith("]"):
        return str(ipaddress.IPv6Address(host[1:-1])), int(port)
    try:
        return str(ipaddress.IPv4Address(host)), int(port)
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        raise ValueError("not an IPv4 address, a [bracketed] IPv6 address or a host name")
    return host, int(port)


@dataclass(frozen=True)
class SyslogConfig:
    """[syslog]: every record also to a remote collector, RFC 5424 over TCP with octet-counting
    framing (RFC 6587), TLS as an option. Records wait in a bounded buffer while the collector is
    away; beyond it they are dropped and counted."""

    address: str = ""  # "collector.example:6514"; "": no collector
    tls: bool = False
    ca_file: str = ""  # the CA the collector's certificate must chain to; "": the system's
    cert_file: str = ""  # a client certificate (PEM), for a collector that asks for one
    key_file: str = ""  # its key; "": in cert_file
    buffer: int = 10000  # records held while the collector is away
    app_name: str = "nftdivert"  # RFC 5424's APP-NAME: a collector tells gateways (or runs) apart by it
    facility: str = "local0"

    def validate(self, key: str) -> None:
        _check_parsed(f"{key}.address", self.address, collector_address, '"collector.example:6514"')
        _check_type(f"{key}.tls", self.tls, bool, "true or false")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            _check_path(f"{key}.{name}", value)
            if value and not self.tls:
                raise ConfigError(f"{key}.{name}", value, "only with tls = true: plain TCP has no certificates")
        if self.key_file and not self.cert_file:
            raise ConfigError(f"{key}.key_file", self.key_file, "a key needs its certificate: set cert_file too")
        _check_type(f"{key}.buffer", self.buffer, int, "a number of records")
        if not 1 <= self.buffer <= MAX_SYSLOG_BUFFER:
            raise ConfigError(f"{key}.buffer", self.buffer, f"must be 1-{MAX_SYSLOG_BUFFER} records")
        _check_type(f"{key}.app_name", self.app_name, str, "a string")
        if not (1 <= len(self.app_name) <= 48 and all(33 <= ord(c) <= 126 for c in self.app_name)):
            raise ConfigError(f"{key}.app_name", self.app_name,
                              "RFC 5424 allows 1-48 printable ASCII characters, no spaces")
        _check_choice(f"{key}.facility", self.facility, tuple(SYSLOG_FACILITIES))


# A DNS name as the [dns] nxdomain list takes it: letters, digits, '-' and
# '_' (service labels like _dmarc), dot-separated; "*." may lead.
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# What an HTTP header value may hold: visible ASCII and inner spaces (no CR/LF).
_HEADER_VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True)
class DnsConfig:
    """What the built-in DNS listener answers. Each name gets an address of its
    own from these pools, one name per address at any time; when a pool is
    full, the least recently asked name's address is recycled (and logged).

    198.18.0.0/15 is the benchmarking range (RFC 2544) that fake-IP DNS tools
    use: 131,070 addresses, reserved, never routed on the internet. The IPv6
    pool lies in the documentation prefix 2001:db8::/32. A pool holds at most
    max_names names, so memory stays bounded however many names are asked."""

    answer_v4: str = "198.18.0.0/15"
    answer_v6: str = "2001:db8:53::/64"
    max_names: int = 131072  # per pool
    # A name's address derives from it and this key: gateways sharing a key agree. "": in order of asking.
    pool_key: str = ""
    ttl: int = 60
    nxdomain: tuple[str, ...] = ()  # "name.example" or "*.zone.example": answered NXDOMAIN
    txt: str = "v=spf1 -all"  # the answer to every TXT question
    # Every A (or AAAA) question gets this one address instead of a pool's; "": the pools.
    one_address: str = ""
    records: tuple["DnsRecord", ...] = ()  # [[dns.records]]: fixed answers by name, before everything else

    def __post_init__(self) -> None:
        if isinstance(self.nxdomain, list):  # as TOML gives it
            object.__setattr__(self, "nxdomain", tuple(self.nxdomain))

    def validate(self, key: str) -> None:
        for name, version in (("answer_v4", 4), ("answer_v6", 6)):
            net = _network(f"{key}.{name}", getattr(self, name))
            if net.version != version:
                raise ConfigError(f"{key}.{name}", getattr(self, name), f"must be an IPv{version} address or network")
            if net.is_loopback or net.is_multicast or net.is_unspecified:
                raise ConfigError(f"{key}.{name}", getattr(self, name),
                                  "must be an address that is then diverted (not loopback, multicast or unspecified)")
        _check_type(f"{key}.max_names", self.max_names, int, "an integer")
        if not 1 <= self.max_names <= 4_194_304:
            raise ConfigError(f"{key}.max_names", self.max_names, "must be 1-4194304 (each name takes memory)")
        _check_type(f"{key}.pool_key", self.pool_key, str, "a string")
        if len(self.pool_key.encode()) > 256:
            raise ConfigError(f"{key}.pool_key", self.pool_key, "at most 256 bytes")
        _check_type(f"{key}.ttl", self.ttl, int, "an integer number of seconds")
        if not 0 <= self.ttl <= 86400:
            raise ConfigError(f"{key}.ttl", self.ttl, "must be 0-86400")
        _check_type(f"{key}.nxdomain", self.nxdomain, tuple, "a list")
        for i, pattern in enumerate(self.nxdomain):
            _check_dns_pattern(f"{key}.nxdomain[{i}]", pattern)
        _check_type(f"{key}.txt", self.txt, str, "a string")
        if len(self.txt.encode()) > 255:
            raise ConfigError(f"{key}.txt", self.txt, "a TXT string holds at most 255 bytes")
        _check_type(f"{key}.one_address", self.one_address, str, 'an address like "192.0.2.1", or ""')
        if self.one_address:
            _check_address(f"{key}.one_address", self.one_address, None)
        for i, record in enumerate(self.records):
            record.validate(f"{key}.records[{i}]")

    def pools(self) -> tuple[Network, Network]:
        return ipaddress.ip_network(self.answer_v4), ipaddress.ip_network(self.answer_v6)

    def fixed(self) -> tuple[str, ...]:
        """The addresses the analyst fixed: the records' A and AAAA values ("self" aside) and one_address."""
        given = [r.value for r in self.records if r.type in ("A", "AAAA") and r.value != "self"]
        return tuple(a for a in (*given, self.one_address) if a)

    def named(self) -> tuple[Network, ...]:
        """Where the addresses that stand for names lie: the pools, the fixed records' and one_address."""
        return (*self.pools(), *(ipaddress.ip_network(a) for a in self.fixed()))


DNS_RECORD_TYPES = ("A", "AAAA", "CNAME", "MX", "TXT", "PTR")


@dataclass(frozen=True)
class DnsRecord:
    """A fixed DNS answer: `name` (or "*.zone") gets `value` for questions of `type`.
    A and AAAA take "self": the address the question came to (the gateway's own)."""

    name: str
    type: str
    value: str

    def validate(self, key: str) -> None:
        _check_dns_pattern(f"{key}.name", self.name)
        _check_choice(f"{key}.type", self.type, DNS_RECORD_TYPES)
        _check_type(f"{key}.value", self.value, str, "a string")
        if self.type in ("A", "AAAA"):
            if self.value != "self":
                _check_address(f"{key}.value", self.value, 4 if self.type == "A" else 6)
        elif self.type == "TXT":
            if len(self.value.encode()) > 255:
                raise ConfigError(f"{key}.value", self.value, "a TXT string holds at most 255 bytes")
        else:
            preference, _, target = self.value.rpartition(" ")
            if self.type == "MX" and not (preference.isascii() and preference.isdigit()
                                          and int(preference) <= 65535):
                raise ConfigError(f"{key}.value", self.value, 'an MX value is a preference and a name: "10 mail.example"')
            if self.type != "MX" and preference:
                raise ConfigError(f"{key}.value", self.value, "a name, without spaces")
            _check_dns_pattern(f"{key}.value", target)
            if target.startswith("*"):
                raise ConfigError(f"{key}.value", self.value, "a name, not a pattern")


def _check_address(key: str, value: str, version: int | None) -> None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(key, value, "not an IP address") from None
    if version is not None and address.version != version:
        raise ConfigError(key, value, f"must be an IPv{version} address")


def _check_dns_pattern(key: str, value: object) -> None:
    _check_type(key, value, str, 'a name like "c2.example" or "*.blocked.example"')
    assert isinstance(value, str)
    name = (value[2:] if value.startswith("*.") else value).rstrip(".")
    if "*" in name:
        raise ConfigError(key, value, 'a wildcard only as the whole first label, like "*.blocked.example"')
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ConfigError(key, value, "not a DNS name: dot-separated labels of 1-63 letters, digits, '-' or '_', "
                                      "at most 253 characters")


@dataclass(frozen=True)
class HttpConfig:
    """The built-in echo listener's answer to an HTTP request. Neutral by
    default: what a plain web server says, nothing naming nftdivert."""

    server: str = "nginx"  # the Server header; "" sends none
    content_type: str = "text/html"
    body: str = ("<!DOCTYPE html>\n<html><head><title>Welcome</title></head>"
                 "<body><h1>Welcome</h1></body></html>\n")
    rules: tuple["HttpRule", ...] = ()  # the first whose host and path match answers
    bodies_dir: str = "/var/lib/nftdivert/bodies"  # request bodies, named by sha256; "" saves none
    max_body: int = 64 * 1024 * 1024  # at most this much of a body is saved (all of it is hashed)

    def validate(self, key: str) -> None:
        for name in ("server", "content_type"):
            value = getattr(self, name)
            _check_type(f"{key}.{name}", value, str, "a string")
            if (value or name == "content_type") and (len(value) > 256 or not _HEADER_VALUE.fullmatch(value)):
                raise ConfigError(f"{key}.{name}", value,
                                  "a header value is 1-256 visible ASCII characters (spaces inside, no line breaks)")
        _check_type(f"{key}.body", self.body, str, "a string")
        if len(self.body.encode()) > 65536:
            raise ConfigError(f"{key}.body", self.body[:40] + "...", "at most 64 KiB")
        _check_path(f"{key}.bodies_dir", self.bodies_dir)
        _check_type(f"{key}.max_body", self.max_body, int, "a number of bytes")
        if not 0 <= self.max_body <= 1 << 30:
            raise ConfigError(f"{key}.max_body", self.max_body, "0-1073741824 bytes (0: save nothing)")
        for i, rule in enumerate(self.rules):
            rule.validate(f"{key}.rules[{i}]")


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
MAX_RULE_FILE = 64 * 1024 * 1024


@dataclass(frozen=True)
class HttpRule:
    """An HTTP answer for requests whose Host and path match these patterns (fnmatch, `*`)."""

    host: str = "*"
    path: str = "*"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""
    file: str = ""  # a file's contents instead of `body`
    ports: tuple[PortRange, ...] = ()  # the port the client asked for; none: any
    method: str = "*"  # a pattern: "POST", "P*"
    query: tuple[tuple[str, str], ...] = ()  # parameters that must be there, each matching its pattern
    delay: float = 0.0  # seconds before the answer
    redirect: str = ""  # a 302 to this URL
    close: bool = False  # close without an answer
    script: str = ""  # a Python file with `def http(request)` -> (status, headers, body)

    def validate(self, key: str) -> None:
        _check_type(f"{key}.method", self.method, str, 'a pattern like "POST"')
        if not re.fullmatch(r"[A-Za-z*?\[\]!-]{1,32}", self.method):
            raise ConfigError(f"{key}.method", self.method, 'a method or a pattern of one, like "POST" or "P*"')
        for name, pattern in self.query:
            if not isinstance(pattern, str) or not pattern.isprintable():
                raise ConfigError(f"{key}.query.{name}", pattern, 'a pattern string, like "*" or "42"')
        _check_type(f"{key}.delay", self.delay, (int, float), "a number of seconds")
        if not 0 <= self.delay <= 3600:
            raise ConfigError(f"{key}.delay", self.delay, "0-3600 seconds")
        _check_type(f"{key}.redirect", self.redirect, str, 'a URL like "https://example.com/"')
        if self.redirect and not (self.redirect.startswith(("http://", "https://"))
                                  and _HEADER_VALUE.fullmatch(self.redirect) and len(self.redirect) <= 1024):
            raise ConfigError(f"{key}.redirect", self.redirect, "an http:// or https:// URL of visible characters")
        _check_type(f"{key}.close", self.close, bool, "true or false")
        _check_type(f"{key}.script", self.script, str, "a path string")
        answers = [n for n in ("body", "file", "redirect", "close", "script") if getattr(self, n)]
        if len(answers) > 1:
            raise ConfigError(f"{key}.{answers[1]}", getattr(self, answers[1]),
                              f"{answers[0]} and {answers[1]} are both given: one answer (body, file, redirect, close "
                              "or script), not both")
        if self.script:
            check_script(f"{key}.script", self.script, "http")
        for name in ("host", "path"):
            value = getattr(self, name)
            _check_type(f"{key}.{name}", value, str, "a pattern string")
            if not value or len(value) > 1024 or not value.isprintable():
                raise ConfigError(f"{key}.{name}", value, "a pattern of 1-1024 printable characters")
        _check_type(f"{key}.status", self.status, int, "an HTTP status code")
        if not 200 <= self.status <= 599:
            raise ConfigError(f"{key}.status", self.status, "a final status is 200-599")
        for name, value in self.headers:
            if not _HEADER_NAME.fullmatch(name):
                raise ConfigError(f"{key}.headers", name, "a header name is 1-64 token characters")
            if not isinstance(value, str) or len(value) > 1024 or not _HEADER_VALUE.fullmatch(value):
                raise ConfigError(f"{key}.headers.{name}", value,
                                  "a header value is a string of 1-1024 visible ASCII characters (no line breaks)")
            if name.lower() in ("content-length", "transfer-encoding", "connection"):
                raise ConfigError(f"{key}.headers", name, "set by the server from the body; leave it out")
        _check_type(f"{key}.body", self.body, str, "a string")
        _check_path(f"{key}.file", self.file)
        if self.body and self.file:
            raise ConfigError(f"{key}.file", self.file, "give a body or a file, not both")
        if self.file:
            _check_file(f"{key}.file", self.file)


def _check_file(key: str, path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(key, path, exc.strerror or str(exc)) from None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.R_OK):
        raise ConfigError(key, path, "not a readable regular file")
    if st.st_size > MAX_RULE_FILE:
        raise ConfigError(key, path, "larger than 64 MiB")


ANSWER_KEYS = ("static", "hex", "base64", "file", "script")
WHEN = ("first", "after_first_message", "every_message")
SCRIPT_FUNCTIONS = {"tcp": "async def tcp(conn)", "udp": "def udp(datagram, info)", "http": "def http(request)"}


@dataclass(frozen=True)
class CustomRule:
    """An answer the analyst writes, for conversations on the default listeners whose original
    port, address and DNS name match (each: any, when not given)."""

    protocol: str
    name: str = ""  # in the log's `custom` records; "": custom[i]
    ports: tuple[PortRange, ...] = ()
    hosts: tuple[Network, ...] = ()
    names: tuple[str, ...] = ()  # "c2.example" or "*.c2.example": the DNS pool's name for the address
    static: str | None = None
    hex: str | None = None
    base64: str | None = None
    file: str | None = None
    script: str | None = None  # a Python file with `async def tcp(conn)` or `def udp(datagram, info)`
    when: str = "first"  # TCP: on connection, after the client's first message, or after each; UDP: docs/reference/listeners.md

    def validate(self, key: str) -> None:
        _check_choice(f"{key}.protocol", self.protocol, PROTOCOLS)
        _check_type(f"{key}.name", self.name, str, "a string")
        if self.name and not _LISTENER_NAME.fullmatch(self.name):
            raise ConfigError(f"{key}.name", self.name, "names are 1-32 letters, digits, '_', '.', '-'")
        for i, pattern in enumerate(self.names):
            _check_dns_pattern(f"{key}.names[{i}]", pattern)
        _check_choice(f"{key}.when", self.when, WHEN)
        given = [k for k in ANSWER_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"{key}.{given[1] if given else 'static'}", None if not given else getattr(self, given[1]),
                              f"give exactly one of {', '.join(ANSWER_KEYS)}")
        value = getattr(self, given[0])
        _check_type(f"{key}.{given[0]}", value, str, "a string")
        try:
            self.payload()
        except ValueError as exc:
            raise ConfigError(f"{key}.{given[0]}", value, str(exc)) from None
        if self.file is not None:
            _check_file(f"{key}.file", self.file)
        if self.script is not None:
            check_script(f"{key}.script", self.script, self.protocol)

    def payload(self) -> bytes | None:
        """The fixed answer's bytes (a file is read now); None for a script. ValueError says why not."""
        import base64
        import binascii

        if self.static is not None:
            return self.static.encode()
        if self.hex is not None:
            try:
                return bytes.fromhex(self.hex)
            except ValueError:
                raise ValueError("not hex digits (pairs, spaces allowed)") from None
        if self.base64 is not None:
            try:
                return base64.b64decode(self.base64, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"not base64: {exc}") from None
        if self.file is not None:
            return Path(self.file).read_bytes() if os.path.isfile(self.file) else b""
        return None


def check_script(key: str, path: str, function: str) -> None:
    """The script compiles and defines `function` (what SCRIPT_FUNCTIONS names); it is run only by the listeners."""
    import ast

    _check_path(key, path)
    _check_file(key, path)
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=path)
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(key, path, f"does not load: {type(exc).__name__}: {exc}") from None
    kind = ast.AsyncFunctionDef if function == "tcp" else ast.FunctionDef
    if not any(isinstance(node, kind) and node.name == function for node in tree.body):
        raise ConfigError(key, path, f"defines no `{SCRIPT_FUNCTIONS[function]}`")


@dataclass(frozen=True)
class TlsConfig:
    """The CA the TLS answer's certificates chain to, and where session keys go."""

    state_dir: str = "/var/lib/nftdivert"  # the CA (ca.pem, ca.key): made on first use, 0700
    keylog: str = ""  # an NSS key log (SSLKEYLOGFILE format) for Wireshark; "" none
    max_certs: int = 1024  # leaf certificates kept in memory

    def validate(self, key: str) -> None:
        _check_path(f"{key}.state_dir", self.state_dir)
        if not self.state_dir:
            raise ConfigError(f"{key}.state_dir", self.state_dir, "the CA needs a directory")
        _check_path(f"{key}.keylog", self.keylog)
        _check_type(f"{key}.max_certs", self.max_certs, int, "a number of certificates")
        if not 1 <= self.max_certs <= 65536:
            raise ConfigError(f"{key}.max_certs", self.max_certs, "1-65536")


@dataclass(frozen=True)
class RecognizeConfig:
    """How long the default TCP listener waits for a client's first bytes."""

    # seconds; a client silent that long on a server-first port gets the greeting
    wait: float = 0.2

    def validate(self, key: str) -> None:
        _check_type(f"{key}.wait", self.wait, (int, float), "a number of seconds")
        if not 0 < self.wait <= 60:
            raise ConfigError(f"{key}.wait", self.wait, "more than 0 and at most 60 seconds")


_BANNER = re.compile(r"SSH-2\.0-[!-~][ -~]{0,200}")  # RFC 4253 4.2: printable ASCII


@dataclass(frozen=True)
class ServerFirstConfig:
    """What the protocols that speak first (SMTP, FTP, POP3, IMAP, SSH) say, and where they keep what they get."""

    hostname: str = "mail.example.com"  # in the SMTP, POP3 and IMAP greetings and the mailbox's message
    mail_dir: str = "/var/lib/nftdivert/mail"  # each mail accepted, named by its sha256; "" keeps none
    uploads_dir: str = "/var/lib/nftdivert/uploads"  # FTP uploads; "" keeps none
    mailbox_dir: str = ""  # the .eml files POP3 and IMAP serve, in name order; "": one neutral message
    ssh_banner: str = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"

    def validate(self, key: str) -> None:
        _check_type(f"{key}.hostname", self.hostname, str, "a host name")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", self.hostname):
            raise ConfigError(f"{key}.hostname", self.hostname, "letters, digits, dots and hyphens, 1-253")
        for name in ("mail_dir", "uploads_dir", "mailbox_dir"):
            _check_path(f"{key}.{name}", getattr(self, name))
        _check_type(f"{key}.ssh_banner", self.ssh_banner, str, "an SSH identification string")
        if not _BANNER.fullmatch(self.ssh_banner):
            raise ConfigError(f"{key}.ssh_banner", self.ssh_banner, "SSH-2.0- then 1-200 printable ASCII characters")


@dataclass(frozen=True)
class SmallServicesConfig:
    """The small services the default listeners answer by port (NTP, Time, Daytime, IRC...)."""

    clock_offset: float = 0.0  # seconds added to the time NTP, Time and Daytime tell
    irc_server: str = "irc.example.net"  # the IRC server's name in its replies

    def validate(self, key: str) -> None:
        _check_type(f"{key}.clock_offset", self.clock_offset, (int, float), "a number of seconds")
        if not abs(self.clock_offset) <= 86400 * 365 * 50:
            raise ConfigError(f"{key}.clock_offset", self.clock_offset, "at most 50 years either way")
        _check_type(f"{key}.irc_server", self.irc_server, str, "a host name")
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,63}", self.irc_server):
            raise ConfigError(f"{key}.irc_server", self.irc_server, "letters, digits, dots and hyphens, 1-63")


HOOK_PLACEHOLDERS = ("client_address", "original_destination", "name", "protocol", "pid", "host_pid", "command",
                     "time")


@dataclass(frozen=True)
class HooksConfig:
    """A command run once per client address (or, where the log names it, per process) on its
    first conversation: argv with {placeholders}, no shell; it never delays the conversation."""

    first_conversation: tuple[str, ...] = ()  # [] : none
    timeout: float = 60.0  # seconds a hook may run before it is killed

    def validate(self, key: str) -> None:
        for i, arg in enumerate(self.first_conversation):
            k = f"{key}.first_conversation[{i}]"
            _check_type(k, arg, str, "a string")
            try:
                arg.format_map({name: "" for name in HOOK_PLACEHOLDERS})
            except (KeyError, ValueError, IndexError, AttributeError) as exc:
                raise ConfigError(k, arg, f"placeholders are {{{'}, {'.join(HOOK_PLACEHOLDERS)}}} ({exc!r})") from None
        if self.first_conversation and not self.first_conversation[0]:
            raise ConfigError(f"{key}.first_conversation[0]", "", "the program to run cannot be empty")
        _check_seconds(f"{key}.timeout", self.timeout)


@dataclass(frozen=True)
class ProfileLeaveAlone:
    """Ports a profile's clients reach undiverted, besides [leave_alone]'s."""

    tcp_ports: tuple[PortRange, ...] = ()
    udp_ports: tuple[PortRange, ...] = ()


@dataclass(frozen=True)
class Profile:
    """[[profiles]]: other answers for the clients in `clients` (the longest prefix wins), and for
    those of an analysis (task) that chooses it; with no clients, only tasks choose it.
    Each section given is the top-level one with the profile's keys over it; None: the top-level one."""

    name: str
    clients: tuple[Network, ...] = ()
    dns: DnsConfig | None = None
    http: HttpConfig | None = None
    custom: tuple[CustomRule, ...] | None = None
    hooks: HooksConfig | None = None
    leave_alone: ProfileLeaveAlone = field(default_factory=ProfileLeaveAlone)

    def validate(self, key: str) -> None:
        _check_type(f"{key}.name", self.name, str, "a string")
        if not _LISTENER_NAME.fullmatch(self.name):
            raise ConfigError(f"{key}.name", self.name,
                              "names are 1-32 letters, digits, '_', '.', '-', starting with a letter or digit")
        for section in ("dns", "http", "hooks"):
            if getattr(self, section) is not None:
                getattr(self, section).validate(f"{key}.{section}")
        for i, rule in enumerate(self.custom or ()):
            rule.validate(f"{key}.custom[{i}]")


@dataclass(frozen=True)
class AnalysesConfig:
    """Analyses (tasks): a file the run watches for them, and where each one's evidence goes."""

    file: str = ""  # TOML (or .json) listing tasks with their clients and optional end; "" none
    directory: str = ""  # one directory per task: its log, pcap, saved files, summary and report; "" none

    def validate(self, key: str) -> None:
        _check_path(f"{key}.file", self.file)
        _check_path(f"{key}.directory", self.directory)


DEFAULT_LISTENERS = (
    Listener(name="tcp-echo", protocol="tcp", port=1337),
    Listener(name="udp-echo", protocol="udp", port=1337),
)


MAX_LISTENER_PROCESSES = 64
MAX_QUEUE_WORKERS = 64


@dataclass(frozen=True)
class Config:
    mode: str = "gateway"
    table: str = "nftdivert"
    # How an unbound port reaches its default listener: "queue" (the worker
    # rewrites each packet's port, before conntrack on the way back) or
    # "kernel" (the dstnat rule redirects to the listener's port; conntrack
    # un-NATs the replies; no packet reaches userspace).
    divert_path: str = "queue"
    ipv4: bool = True
    ipv6: bool = True
    # Empty: every interface. Gateway mode answers only for traffic arriving here.
    interfaces: tuple[str, ...] = ()
    # Gateway mode: drop everything a diverted client would have routed onward.
    forward_containment: bool = True
    # keep: a clean stop leaves the containment chain in place (a malware lab
    # must not start routing its clients out when the diverter stops) until
    # `nftdivert remove`; remove: a clean stop takes everything away.
    containment_after_stop: str = "keep"
    listeners: tuple[Listener, ...] = DEFAULT_LISTENERS
    # Processes the built-in listeners run in, sharing their ports (SO_REUSEPORT):
    # 0 = one per CPU the run may use; 1 = one process.
    listener_processes: int = 0
    # The listeners that receive traffic for ports nothing is bound to.
    default_tcp_listener: str | None = "tcp-echo"
    default_udp_listener: str | None = "udp-echo"
    leave_alone: LeaveAlone = field(default_factory=LeaveAlone)
    queue: QueueConfig = field(default_factory=QueueConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    recognize: RecognizeConfig = field(default_factory=RecognizeConfig)
    server_first: ServerFirstConfig = field(default_factory=ServerFirstConfig)
    small_services: SmallServicesConfig = field(default_factory=SmallServicesConfig)
    custom: tuple[CustomRule, ...] = ()  # [[custom]]: answers the analyst writes, the first match answers
    hooks: HooksConfig = field(default_factory=HooksConfig)
    profiles: tuple[Profile, ...] = ()  # [[profiles]]: other answers for some clients, by address
    syslog: SyslogConfig = field(default_factory=SyslogConfig)
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("divert_path", self.divert_path, DIVERT_PATHS)
        check_table_syntax(self.table)
        for name in ("ipv4", "ipv6", "forward_containment"):
            _check_type(name, getattr(self, name), bool, "true or false")
        _check_choice("containment_after_stop", self.containment_after_stop, AFTER_STOP)
        _check_type("listener_processes", self.listener_processes, int, "a number of processes (0: one per CPU)")
        if not 0 <= self.listener_processes <= MAX_LISTENER_PROCESSES:
            raise ConfigError("listener_processes", self.listener_processes, f"0-{MAX_LISTENER_PROCESSES}")
        if not (self.ipv4 or self.ipv6):
            raise ConfigError("ipv6", self.ipv6, "ipv4 and ipv6 are both off: nothing would be diverted")
        for i, name in enumerate(self.interfaces):
            _check_interface(f"interfaces[{i}]", name)
        self.queue.validate("queue")
        self.leave_alone.validate("leave_alone")
        self.worker.validate("worker")
        self.dns.validate("dns")
        self.http.validate("http")
        self.tls.validate("tls")
        self.recognize.validate("recognize")
        self.server_first.validate("server_first")
        self.small_services.validate("small_services")
        self.hooks.validate("hooks")
        self.syslog.validate("syslog")
        self.analyses.validate("analyses")
        self._validate_listeners()
        for i, rule in enumerate(self.custom):
            rule.validate(f"custom[{i}]")
        self._validate_profiles()
        if self.queue.ct_mark & self.worker.ct_mark:
            raise ConfigError("queue.ct_mark", self.queue.ct_mark,
                              f"shares bits with worker.ct_mark ({self.worker.ct_mark:#x}): each marks something else")
        if self.queue.admission_group == self.worker.pcap_group:
            raise ConfigError("queue.admission_group", self.queue.admission_group,
                              "must differ from worker.pcap_group: one reader per nflog group")
        if (self.analyses.file or self.analyses.directory) and self.worker.log == "":
            raise ConfigError("analyses.file" if self.analyses.file else "analyses.directory",
                              self.analyses.file or self.analyses.directory,
                              'analyses tag and split the conversation log, which is off (--log "")')
        self.queue.worker_numbers(self.queue_workers())
        if self.queue.workers > 1 and self.worker.pcap_rewritten:
            raise ConfigError("worker.pcap_rewritten", self.worker.pcap_rewritten,
                              f"is one worker's view, and queue.workers is {self.queue.workers}: set it to 1 "
                              "(or 0, which with pcap_rewritten means one)")
        if self.divert_path == "kernel" and self.worker.pcap_rewritten:
            raise ConfigError("worker.pcap_rewritten", self.worker.pcap_rewritten,
                              'the kernel path has no queue worker whose view it would be; use divert_path = "queue"')

    def queue_workers(self) -> int:
        """How many queue workers run: none on the kernel path; `queue.workers`, or one per
        CPU this run may use (one while pcap_rewritten, a single worker's view, is asked for)."""
        if self.divert_path == "kernel":
            return 0
        if self.queue.workers:
            return self.queue.workers
        if self.worker.pcap_rewritten:
            return 1
        return min(len(os.sched_getaffinity(0)), MAX_QUEUE_WORKERS)

    def _validate_listeners(self) -> None:
        names: set[str] = set()
        ports: set[tuple[str, int]] = set()
        for i, lst in enumerate(self.listeners):
            lst.validate(f"listeners[{i}]")
            if lst.name in names:
                raise ConfigError(f"listeners[{i}].name", lst.name, "another listener has this name")
            if (lst.protocol, lst.port) in ports:
                raise ConfigError(f"listeners[{i}].port", lst.port, f"another {lst.protocol} listener has this port")
            names.add(lst.name)
            ports.add((lst.protocol, lst.port))
        for proto in PROTOCOLS:
            key = f"default_{proto}_listener"
            name = getattr(self, key)
            if name is None:
                continue
            _check_type(key, name, str, "a listener name")
            match = [lst for lst in self.listeners if lst.name == name]
            if not match:
                raise ConfigError(key, name, "no listener has this name")
            if match[0].protocol != proto:
                raise ConfigError(key, name, f"that listener is {match[0].protocol}, not {proto}")
            ranges = getattr(self.leave_alone, f"{proto}_ports")
            if any(match[0].port in r for r in ranges):
                raise ConfigError(key, name, f"its port {match[0].port} is in leave_alone.{proto}_ports")

    def _validate_profiles(self) -> None:
        names: dict[str, int] = {}
        owners: dict[Network, int] = {}
        for i, profile in enumerate(self.profiles):
            profile.validate(f"profiles[{i}]")
            if profile.name in names:
                raise ConfigError(f"profiles[{i}].name", profile.name, f"profiles[{names[profile.name]}] has this name")
            names[profile.name] = i
            for j, net in enumerate(profile.clients):
                if net in owners:
                    raise ConfigError(f"profiles[{i}].clients[{j}]", str(net),
                                      f"profiles[{owners[net]}] has this prefix too: the longest prefix wins, "
                                      "so equal ones would leave it to chance")
                owners[net] = i
        self._validate_pools()

    def dns_sections(self) -> tuple[tuple[str, DnsConfig], ...]:
        """(key, section): [dns], then each profile's [profiles.dns] that is given."""
        return (("dns", self.dns),
                *((f"profiles[{i}].dns", p.dns) for i, p in enumerate(self.profiles) if p.dns is not None))

    def dns_pools(self) -> dict[Network, DnsConfig]:
        """Each DNS pool once, by its network (sections with the same network share the one pool):
        the first section that gives it (its max_names and pool_key are every sharer's)."""
        pools: dict[Network, DnsConfig] = {}
        for _, dns in self.dns_sections():
            for net in dns.pools():
                pools.setdefault(net, dns)
        return pools

    def _validate_pools(self) -> None:
        """A profile's pool is another's exactly (one pool, so one max_names and pool_key) or apart from
        every other pool and every fixed address: an address stands for one name, whoever asked."""
        pools: dict[Network, tuple[str, DnsConfig]] = {}  # -> the key that gives it first, and its section
        fixed = [(f"{key}.{'records' if a != dns.one_address else 'one_address'}", ipaddress.ip_address(a))
                 for key, dns in self.dns_sections() for a in dns.fixed()]
        for key, dns in self.dns_sections():
            for name, net in zip(("answer_v4", "answer_v6"), dns.pools()):
                if net in pools:
                    owner, first = pools[net]
                    for k in ("max_names", "pool_key"):
                        if getattr(dns, k) != getattr(first, k):
                            raise ConfigError(f"{key}.{k}", getattr(dns, k),
                                              f"{owner} is its {net} too, with {k} {getattr(first, k)!r}: one network "
                                              "is one pool (give the profile answer_v4 and answer_v6 of its own)")
                    continue
                other = next((o for o in pools if net.overlaps(o)), None)
                if other is not None:
                    raise ConfigError(f"{key}.{name}", str(net), f"overlaps {pools[other][0]} {other}: a pool is "
                                      "another's exactly (then shared) or apart from it, so an address names one name")
                if key != "dns":  # (a fixed address in the top-level pool is as it always was)
                    inside = next(((k, a) for k, a in fixed if a in net), None)
                    if inside is not None:
                        raise ConfigError(f"{key}.{name}", str(net), f"holds the fixed address {inside[1]} of "
                                          f"{inside[0]}: an address names one name")
                pools[net] = (f"{key}.{name}", dns)

    def default_listener(self, protocol: str) -> Listener | None:
        name = getattr(self, f"default_{protocol}_listener")
        return next((lst for lst in self.listeners if lst.name == name), None)


def _check_interface(key: str, name: object) -> None:
    _check_type(key, name, str, "an interface name")
    assert isinstance(name, str)
    # The kernel's own rule (dev_valid_name), plus nft's trailing wildcard.
    base = name[:-1] if name.endswith("*") else name
    # IFNAMSIZ counts bytes: "é" takes two.
    if not name or len(name.encode("utf-8")) > 15:
        raise ConfigError(key, name, "interface names are 1-15 characters (bytes)")
    if not base:
        raise ConfigError(key, name, "a wildcard needs a prefix (nft refuses a bare '*'); no interfaces means all")
    if name in (".", "..") or any(c in _NFT_SYNTAX or c in "/:*" or not c.isprintable() for c in base):
        raise ConfigError(key, name, "the kernel refuses this interface name (no spaces, quotes, '/', ':', braces, ';' or '#')")


# ---- loading ---------------------------------------------------------------

_SECTIONS = {"leave_alone": LeaveAlone, "queue": QueueConfig, "worker": WorkerConfig, "dns": DnsConfig,
             "http": HttpConfig, "tls": TlsConfig, "recognize": RecognizeConfig,
             "server_first": ServerFirstConfig, "small_services": SmallServicesConfig, "hooks": HooksConfig,
             "syslog": SyslogConfig,
             "analyses": AnalysesConfig}


def _known_keys(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _reject_unknown(prefix: str, data: Mapping[str, Any], cls: type) -> None:
    for key in data:
        if key not in _known_keys(cls):
            known = ", ".join(sorted(_known_keys(cls)))
            raise ConfigError(f"{prefix}{key}", data[key], f"unknown key (known here: {known})")


def _as_list(key: str, value: object) -> list:
    _check_type(key, value, list, "a list")
    return value  # type: ignore[return-value]


def _section(key: str, data: Mapping[str, Any], cls: type | None = None) -> Any:
    return (cls or _SECTIONS[key])(**_section_values(key, data, cls or _SECTIONS[key]))


def _section_values(key: str, data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """A section's keys, each parsed into what `cls` takes (`key`: its name in errors)."""
    _check_type(key, data, dict, "a table")
    _reject_unknown(f"{key}.", data, cls)
    values = dict(data)
    if cls in (LeaveAlone, ProfileLeaveAlone):
        for proto in PROTOCOLS:
            k = f"{proto}_ports"
            if k in values:
                values[k] = tuple(PortRange.parse(f"{key}.{k}[{i}]", v) for i, v in enumerate(_as_list(f"{key}.{k}", values[k])))
        if "hosts" in values:
            values["hosts"] = tuple(_network(f"{key}.hosts[{i}]", v) for i, v in enumerate(_as_list(f"{key}.hosts", values["hosts"])))
        for k in ("users", "groups", "cgroups"):
            if k in values:
                values[k] = tuple(_as_list(f"{key}.{k}", values[k]))
    if cls is HooksConfig and "first_conversation" in values:
        values["first_conversation"] = tuple(_as_list(f"{key}.first_conversation", values["first_conversation"]))
    if cls is DnsConfig and "records" in values:
        values["records"] = tuple(_dns_record(f"{key}.records[{i}]", v)
                                  for i, v in enumerate(_as_list(f"{key}.records", values["records"])))
    if cls is HttpConfig and "rules" in values:
        values["rules"] = tuple(_http_rule(f"{key}.rules[{i}]", v)
                                for i, v in enumerate(_as_list(f"{key}.rules", values["rules"])))
    return values


def _profile(key: str, data: object, top: Mapping[str, Any]) -> Profile:
    """[[profiles]]: each section given becomes the top-level one (`top`, parsed) with these keys over it."""
    _check_type(key, data, dict, "a table with name, clients and the answers to give them")
    assert isinstance(data, dict)
    _reject_unknown(f"{key}.", data, Profile)
    if "name" not in data:
        raise ConfigError(f"{key}.name", None, "missing: every profile needs a name")
    values: dict[str, Any] = {"name": data["name"]}
    values["clients"] = tuple(_network(f"{key}.clients[{i}]", v)  # none: only analyses choose it
                              for i, v in enumerate(_as_list(f"{key}.clients", data.get("clients", []))))
    for name, cls in (("dns", DnsConfig), ("http", HttpConfig), ("hooks", HooksConfig)):
        if name in data:
            values[name] = replace(top.get(name) or cls(), **_section_values(f"{key}.{name}", data[name], cls))
    if "custom" in data:
        values["custom"] = tuple(_custom_rule(f"{key}.custom[{i}]", i, v)
                                 for i, v in enumerate(_as_list(f"{key}.custom", data["custom"])))
    if "leave_alone" in data:
        values["leave_alone"] = _section(f"{key}.leave_alone", data["leave_alone"], ProfileLeaveAlone)
    return Profile(**values)


def _parse_list(key: str, values: dict, name: str, parse) -> None:
    """values[name], a list, each item parsed by `parse(item_key, item)`."""
    if name in values:
        values[name] = tuple(parse(f"{key}.{name}[{i}]", v) for i, v in enumerate(_as_list(f"{key}.{name}", values[name])))


def _dns_record(key: str, data: object) -> DnsRecord:
    return _table(key, data, DnsRecord, "record", ("name", "type", "value"))


def _table(key: str, data: object, cls: type, what: str, required: tuple[str, ...]):
    """A [[table]] of `cls`'s keys, with the `required` ones."""
    names = f"{', '.join(required[:-1])} and {required[-1]}"
    _check_type(key, data, dict, f"a table with {names}")
    assert isinstance(data, dict)
    _reject_unknown(f"{key}.", data, cls)
    for name in required:
        if name not in data:
            raise ConfigError(f"{key}.{name}", None, f"missing: every {what} needs {names}")
    return cls(**data)


def _http_rule(key: str, data: object) -> HttpRule:
    _check_type(key, data, dict, "a table with host, path, status, headers, body or file")
    assert isinstance(data, dict)
    _reject_unknown(f"{key}.", data, HttpRule)
    values = dict(data)
    if "headers" in values:
        _check_type(f"{key}.headers", values["headers"], dict, 'a table like {"Content-Type" = "text/plain"}')
        values["headers"] = tuple(values["headers"].items())
    if "query" in values:
        _check_type(f"{key}.query", values["query"], dict, 'a table like {id = "*"}')
        values["query"] = tuple(values["query"].items())
    _parse_list(key, values, "ports", PortRange.parse)
    return HttpRule(**values)


def _custom_rule(key: str, index: int, data: object) -> CustomRule:
    _check_type(key, data, dict, "a table with protocol, ports and an answer")
    assert isinstance(data, dict)
    _reject_unknown(f"{key}.", data, CustomRule)
    if "protocol" not in data:
        raise ConfigError(f"{key}.protocol", None, 'missing: "tcp" or "udp"')
    values = dict(data)
    values.setdefault("name", f"custom{index}")
    _parse_list(key, values, "ports", PortRange.parse)
    _parse_list(key, values, "hosts", _network)
    if "names" in values:
        values["names"] = tuple(_as_list(f"{key}.names", values["names"]))
    return CustomRule(**values)


def _network(key: str, value: object) -> Network:
    _check_type(key, value, str, 'an address or network like "192.0.2.0/24"')
    assert isinstance(value, str)
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        reason = str(exc)
        if "host bits set" in reason:
            reason = "host bits set: the address has bits beyond the prefix length"
        raise ConfigError(key, value, reason) from None
    # ipaddress accepts an IPv6 scope ("fe80::%eth0/64") of any text, which
    # would reach the ruleset verbatim; nft sets hold no scopes anyway.
    if getattr(net.network_address, "scope_id", None) is not None:
        raise ConfigError(key, value, "an IPv6 scope ('%...') has no place here: nftables addresses have none")
    return net


def _listener(key: str, data: object) -> Listener:
    return _table(key, data, Listener, "listener", ("name", "protocol", "port"))


def from_mapping(data: Mapping[str, Any]) -> Config:
    """Build a validated Config from parsed TOML; raise ConfigError on bad input."""
    _reject_unknown("", data, Config)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            values[key] = _section(key, value)
        elif key == "listeners":
            values[key] = tuple(_listener(f"listeners[{i}]", v) for i, v in enumerate(_as_list(key, value)))
        elif key == "interfaces":
            values[key] = tuple(_as_list(key, value))
        elif key == "custom":
            values[key] = tuple(_custom_rule(f"custom[{i}]", i, v) for i, v in enumerate(_as_list(key, value)))
        elif key != "profiles":  # after the sections they build on
            values[key] = value
    if "profiles" in data:
        values["profiles"] = tuple(_profile(f"profiles[{i}]", v, values)
                                   for i, v in enumerate(_as_list("profiles", data["profiles"])))
    for proto in PROTOCOLS:
        key = f"default_{proto}_listener"
        if values.get(key) == "":
            values[key] = None  # TOML has no null: "" means no default listener
        elif key not in values and "listeners" in values:
            # Own listeners without a say: the first of each protocol takes the rest.
            values[key] = next((lst.name for lst in values["listeners"] if lst.protocol == proto), None)
    try:
        return Config(**values)
    except TypeError as exc:  # a dataclass field given something unusable
        raise ConfigError("(config)", None, str(exc)) from None


def read_input(path: str | Path, key: str) -> str:
    """A config or ruleset file's text: UTF-8, at most MAX_INPUT_BYTES, read with that bound.

    Regular files and pipes (`-c <(...)`) are read; devices, sockets and
    directories are refused before a byte is read. A pipe that stays silent
    for INPUT_WAIT seconds (a FIFO nobody opened to write) is refused too:
    opened without O_NONBLOCK, it would block the open forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(key, str(path), exc.strerror or str(exc)) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError(key, str(path), "not a regular file or a pipe")
        try:
            data = _read_pipe(fd, MAX_INPUT_BYTES + 1) if stat.S_ISFIFO(mode) else f.read(MAX_INPUT_BYTES + 1)
        except TimeoutError:
            raise ConfigError(key, str(path), f"a pipe that nothing was written to for {INPUT_WAIT:g} s "
                                              "(does anything write to it?)") from None
        except OSError as exc:
            raise ConfigError(key, str(path), exc.strerror or str(exc)) from None
    if len(data) > MAX_INPUT_BYTES:
        raise ConfigError(key, str(path), f"larger than {MAX_INPUT_BYTES // 1024} KiB: refused unread")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(key, str(path), f"not UTF-8 text (byte {exc.start})") from None


def _read_pipe(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes, until every writer has closed; TimeoutError after INPUT_WAIT s of silence.

    Linux does not report a FIFO that never had a writer as closed: poll waits for one to come.
    """
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    data = bytearray()
    while len(data) < limit:
        if not poll.poll(INPUT_WAIT * 1000):
            raise TimeoutError
        try:
            chunk = os.read(fd, limit - len(data))
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)


def load(path: str | Path | None, defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read a TOML config file; None means the embedded safe default.

    `defaults`: section -> key -> value, a command's own defaults where the
    file says nothing (the sandbox's admission)."""
    if path is None:
        return from_mapping(defaults) if defaults else Config()
    text = read_input(path, "--config")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", str(path), f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError("--config", str(path), "not valid TOML: nested too deeply") from None
    for section, values in (defaults or {}).items():
        given = data.get(section, {})
        if isinstance(given, dict):  # anything else is refused as it stands
            data[section] = {**values, **given}
    return from_mapping(data)
