"""The lab row's load: one process per client namespace, all at once, each looping

  dns    a question for a name of its own (unique in the run), over UDP to
         the gateway's DNS listener; the answer is a pool address
  http   GET http://NAME/ to that address, port 80
  https  GET https://NAME/ to it, port 443, trusting nftdivert's CA (the
         certificate must name NAME)
  echo   16 bytes to a random 198.51.100.x:port, the same 16 back
  udp    a datagram to a random 203.0.113.x:port, the same datagram back
  ping   an ICMP echo to a random 198.51.100.x (a ping socket)

Each exchange is timed on its own. Each client hands back its counts, its
latencies and every conversation it made (protocol, client, destination,
name), which the log is checked against (lab_run.py).
"""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import time

import load
from common import NOT_ECHOED, BenchError
from lab_topology import GATEWAY_ADDR, client_addr

KINDS = ("dns", "http", "https", "echo", "udp", "ping")
# With unique ports, each TCP connection of a client from the next port from here (no port twice).
UNIQUE_PORTS_FROM = 10000
TIMEOUT = 10.0
AVOID_PORTS = NOT_ECHOED | {1337}  # and the lab's listener


def _port(rng: random.Random) -> int:
    while (port := rng.randint(1, 65535)) in AVOID_PORTS:
        pass
    return port


def dns_question(qid: int, name: str) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)  # A, IN


def _skip_name(msg: bytes, off: int) -> int:
    while msg[off]:
        if msg[off] & 0xC0 == 0xC0:  # a pointer ends the name
            return off + 2
        off += 1 + msg[off]
    return off + 1


def dns_answer(msg: bytes, qid: int) -> str:
    """The first A record of an answer to question `qid`; raises ValueError."""
    rid, flags, qd, an = struct.unpack_from("!HHHH", msg)
    if rid != qid or flags & 0x000F or not an:
        raise ValueError(f"answer id {rid} (asked {qid}), rcode {flags & 0xF}, {an} answers")
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, _ttl, length = struct.unpack_from("!HHIH", msg, off)
        off += 10
        if rtype == 1 and length == 4:
            return socket.inet_ntoa(msg[off:off + 4])
        off += length
    raise ValueError("no A record in the answer")


def _read_all(s) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _http_ok(reply: bytes, what: str) -> None:
    if not reply.startswith(b"HTTP/1.1 200 "):
        raise ValueError(f"{what}: {reply[:40]!r}")


class Client:
    """One client's exchanges; each returns the conversation it made, for the log check."""

    def __init__(self, index: int, seed: int, ca_file: str, unique_ports: bool = False) -> None:
        self.index, self.addr = index, client_addr(index)
        self.ports = iter(range(UNIQUE_PORTS_FROM, 65536)) if unique_ports else None
        self.rng = random.Random(seed)
        self.tls = ssl.create_default_context(cafile=ca_file)
        self.name = ""
        self.answer = ""
        self.dns_asked: list[list[str]] = []

    def _tcp(self, dest: tuple[str, int]) -> socket.socket:
        source = (self.addr, next(self.ports)) if self.ports else None
        return socket.create_connection(dest, timeout=TIMEOUT, source_address=source)

    def dns(self, n: int) -> None:
        self.name = f"c{self.index}-{n}-{self.rng.getrandbits(32):08x}.lab.example"
        qid = self.rng.getrandbits(16)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(TIMEOUT)
            s.connect((GATEWAY_ADDR, 53))
            s.send(dns_question(qid, self.name))
            self.answer = dns_answer(s.recv(4096), qid)
            self.dns_asked.append([f"{self.addr}:{s.getsockname()[1]}", self.name])
        return None  # to the gateway's own address: a `dns` record, no conversation

    def http(self, _n: int) -> list:
        with self._tcp((self.answer, 80)) as s:
            client = s.getsockname()
            s.sendall(f"GET / HTTP/1.1\r\nHost: {self.name}\r\nConnection: close\r\n\r\n".encode())
            _http_ok(_read_all(s), f"http://{self.name}/")
        return ["tcp", f"{client[0]}:{client[1]}", f"{self.answer}:80", self.name]

    def https(self, _n: int) -> list:
        with self._tcp((self.answer, 443)) as raw:
            client = raw.getsockname()
            with self.tls.wrap_socket(raw, server_hostname=self.name) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {self.name}\r\nConnection: close\r\n\r\n".encode())
                _http_ok(_read_all(s), f"https://{self.name}/")
        return ["tcp", f"{client[0]}:{client[1]}", f"{self.answer}:443", self.name]

    def echo(self, n: int) -> list:
        dest = (f"198.51.100.{self.rng.randint(1, 254)}", _port(self.rng))
        payload = f"echo {self.index:03d} {n:09d}".encode()[:16].ljust(16, b".")
        with self._tcp(dest) as s:
            client = s.getsockname()
            s.sendall(payload)
            got = b""
            while len(got) < len(payload) and (chunk := s.recv(64)):
                got += chunk
        if got != payload:
            raise ValueError(f"echo from {dest}: {got!r}")
        return ["tcp", f"{client[0]}:{client[1]}", f"{dest[0]}:{dest[1]}", ""]

    def udp(self, n: int) -> list:
        dest = (f"203.0.113.{self.rng.randint(1, 254)}", _port(self.rng))
        payload = f"udp {self.index} {n}".encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(dest)
            s.send(payload)
            got = s.recv(4096)
            client = s.getsockname()
        if got != payload:
            raise ValueError(f"udp from {dest}: {got!r}")
        return ["udp", f"{client[0]}:{client[1]}", f"{dest[0]}:{dest[1]}", ""]

    def ping(self, n: int) -> list:
        dest = f"198.51.100.{self.rng.randint(1, 254)}"
        payload = f"ping {self.index} {n}".encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as s:
            s.settimeout(TIMEOUT)
            # Type 8, code 0; the kernel sets the id (the socket's) and the checksum.
            s.sendto(struct.pack("!BBHHH", 8, 0, 0, 0, n & 0xFFFF) + payload, (dest, 0))
            while True:
                reply = s.recv(4096)
                if reply[0] == 0 and reply[8:] == payload:
                    break
            ident = s.getsockname()[1]  # the echo's id: conntrack tells pings apart by it
        return ["icmp", self.addr, dest, f"id {ident}"]


def client_loop(index: int, seed: int, ca_file: str, start: float, deadline: float, unique_ports: bool) -> dict:
    """Runs in the client's namespace: every exchange in turn until the deadline."""
    client = Client(index, seed, ca_file, unique_ports)
    lat_us: dict[str, list[int]] = {k: [] for k in KINDS}
    errors = dict.fromkeys(KINDS, 0)
    first_error = ""
    made: list[list] = []
    while time.monotonic() < start:
        time.sleep(0.001)
    n = last_end = 0
    while time.monotonic() < deadline:
        n += 1
        for kind in KINDS:
            if kind in ("http", "https") and not client.answer:
                continue  # no name to ask for: the question failed (counted)
            t0 = time.monotonic()
            try:
                conv = getattr(client, kind)(n)
            except (OSError, ValueError, struct.error, IndexError) as exc:
                errors[kind] += 1
                first_error = first_error or f"client {client.addr} {kind}: {type(exc).__name__}: {exc}"
                if kind == "dns":
                    client.answer = ""
                continue
            last_end = time.monotonic()
            lat_us[kind].append(int((last_end - t0) * 1e6))
            if conv:
                made.append(conv)
    return {"lat_us": lat_us, "errors": errors, "first_error": first_error, "made": made,
            "dns": client.dns_asked, "last_end": last_end, "cpu_seconds": sum(os.times()[:2])}


def run(topo, ca_file: str, seconds: float, rng: random.Random, unique_ports: bool = False) -> dict:
    """All clients at once for `seconds`; their results merged."""
    start = time.monotonic() + 0.5
    deadline = start + seconds
    kids = [load.fork_in(ns, client_loop, i, rng.getrandbits(64), ca_file, start, deadline, unique_ports)
            for i, ns in enumerate(topo.clients)]
    res = load.collect(kids, timeout=seconds + 3 * TIMEOUT + 60)
    lat = {k: sorted(x for r in res for x in r["lat_us"][k]) for k in KINDS}
    done = sum(len(v) for v in lat.values())
    if not done:
        raise BenchError("the lab's clients completed no exchange")
    elapsed = max(r["last_end"] for r in res) - start
    every = sorted(x for v in lat.values() for x in v)
    return {"clients": len(res), "seconds": elapsed, "exchanges": done, "per_s": done / elapsed,
            "by_kind": {k: {"count": len(v), "p50_ms": _pct(v, 0.50), "p99_ms": _pct(v, 0.99)} for k, v in lat.items()},
            "all": {"p50_ms": _pct(every, 0.50), "p99_ms": _pct(every, 0.99)},
            "errors": {k: sum(r["errors"][k] for r in res) for k in KINDS},
            "clients_cpu_seconds": round(sum(r["cpu_seconds"] for r in res), 2),
            "first_error": next((r["first_error"] for r in res if r["first_error"]), ""),
            "made": [c for r in res for c in r["made"]], "dns": [q for r in res for q in r["dns"]]}


def _pct(sorted_us: list[int], p: float) -> float | None:
    return sorted_us[min(len(sorted_us) - 1, int(p * len(sorted_us)))] / 1000 if sorted_us else None
