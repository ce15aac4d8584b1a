#!/usr/bin/env python3
"""nftdivert benchmark: diverted vs. kernel-only, side by side, in one run.

Builds two network namespaces, ndb-<pid>-client and ndb-<pid>-divert, joined
by a veth (diverter 192.0.2.1/24; client 192.0.2.2/24, plus one more address
per connection worker; the client routes 198.51.100.0/24 to the diverter and
nowhere else) and measures, alternating
the two sides round by round (ABBA), with the SAME echo listener code
(nftdivert.listeners.Listeners) on TCP 1337:

  nftdivert    `nftdivert run` (queue backend auto), conversation log as JSON
  kernel-only  one nat rule `redirect to :1337`, no queue, no worker

  conn/s  a few client processes: connect to a random 198.51.100.x:port,
          send 16 bytes, read the 16-byte echo, compare, close; repeat
  MB/s    one connection: a sender thread streams for --seconds, the
          receiver reads the echo concurrently and compares every byte;
          MB/s = bytes echoed back / (connect .. echo EOF), MB = 1e6 bytes
  µs/pkt  FixUp.incoming / FixUp.outgoing in-process (no kernel, no queue)

Run as root:  .venv/bin/python bench/divert_bench.py [--seconds N] [--json FILE]
Exit status: 0 all phases passed, 1 a phase failed, 2 cannot run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN_PID = os.getpid()
NS_PREFIX = "ndb-"
CLIENT_NS = f"{NS_PREFIX}{MAIN_PID}-client"
DIVERT_NS = f"{NS_PREFIX}{MAIN_PID}-divert"
CLIENT_IF, DIVERT_IF = "ndb-c", "ndb-d"
CLIENT_ADDR, DIVERT_ADDR, LINK_PREFIX = "192.0.2.2", "192.0.2.1", 24
TARGETS = "198.51.100"  # the "arbitrary" destinations: 198.51.100.1-254, any port
LISTEN_PORT = 1337
CLONE_NEWNET = 0x40000000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
T0 = time.monotonic()

REF_TABLE = """\
table inet ref {
	chain p {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type != local meta l4proto tcp redirect to :1337
	}
}
"""

# The kernel-only side's listener: the very Listeners nftdivert runs, alone.
ECHO_SERVER = """\
import json, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
from dataclasses import asdict
from nftdivert.config import DEFAULT_LISTENERS
from nftdivert.listeners import Listeners
listeners = Listeners(DEFAULT_LISTENERS, ipv6=True)
listeners.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
listeners.stop()
print(json.dumps({k: asdict(v) for k, v in listeners.stats.items()}), flush=True)
"""


class BenchError(Exception):
    """A phase failed; the message says why."""


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---- namespaces, processes, cleanup ------------------------------------------

def _run(argv: list[str], *, check: bool = True, timeout: float = 30, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def in_ns(ns: str, *argv: str, **kw) -> str:
    return _run(["ip", "netns", "exec", ns, *argv], **kw)


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_ns(ns: str) -> None:
    """Kill everything inside `ns`, then delete it; never raises.

    SIGTERM first, so a stray `nftdivert run` removes its own traces outside the
    namespace (its stats file under /run/nftdivert); SIGKILL what is left.
    """
    for pid in ns_pids(ns):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for _ in range(30):
        if not ns_pids(ns):
            break
        time.sleep(0.1)
    for _ in range(40):
        pids = ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Lab:
    def __init__(self, client_addrs: int = 1) -> None:
        self.client_addrs = client_addrs
        self.procs: list[subprocess.Popen] = []
        self.children: set[int] = set()
        self.made: list[str] = []
        self.closed = False

    def up(self) -> None:
        for ns in (CLIENT_NS, DIVERT_NS):
            _run(["ip", "netns", "add", ns])
            self.made.append(ns)
        _run(["ip", "link", "add", CLIENT_IF, "netns", CLIENT_NS, "type", "veth",
              "peer", "name", DIVERT_IF, "netns", DIVERT_NS])
        for ns, ifname, addr in ((CLIENT_NS, CLIENT_IF, CLIENT_ADDR), (DIVERT_NS, DIVERT_IF, DIVERT_ADDR)):
            in_ns(ns, "ip", "link", "set", "lo", "up")
            in_ns(ns, "ip", "addr", "add", f"{addr}/{LINK_PREFIX}", "dev", ifname)
            in_ns(ns, "ip", "link", "set", ifname, "up")
        # One address per connection worker: each acts as a host of its own.
        for i in range(1, self.client_addrs):
            in_ns(CLIENT_NS, "ip", "addr", "add", f"{client_addr(i)}/{LINK_PREFIX}", "dev", CLIENT_IF)
        in_ns(CLIENT_NS, "ip", "route", "add", f"{TARGETS}.0/24", "via", DIVERT_ADDR, "src", CLIENT_ADDR)
        # Neighbour entry up front, so the first phase does not pay for ARP.
        in_ns(CLIENT_NS, "ping", "-c", "1", "-W", "2", DIVERT_ADDR, check=False)

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        if self.closed or os.getpid() != MAIN_PID:
            return
        self.closed = True
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # nftdivert removes its table on SIGTERM
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for ns in self.made:
            kill_ns(ns)
        left = [ns for ns in self.made if Path(f"/run/netns/{ns}").exists()]
        if left:
            print(f"divert_bench: WARNING: could not remove {left}", file=sys.stderr)
        else:
            say(f"removed namespaces {', '.join(self.made)}")


def stale_namespaces() -> None:
    """Namespaces of an earlier run that was SIGKILLed (its pid is gone)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-\w+", name)
        if not m or int(m.group(1)) == MAIN_PID:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            say(f"removing stale namespace {name} (its benchmark pid is gone)")
            kill_ns(name)
        except PermissionError:
            pass


def _enter_ns(ns: str) -> None:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
    finally:
        os.close(fd)


def fork_in_client(lab: Lab, fn, *args) -> tuple[int, int]:
    """Run fn(*args) -> dict in a child process in the client namespace; (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            _enter_ns(CLIENT_NS)
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result, code = {"fatal": f"{type(exc).__name__}: {exc}"}, 1
        try:
            data = json.dumps(result).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    lab.children.add(pid)
    return pid, r


def collect(lab: Lab, kids: list[tuple[int, int]], timeout: float) -> list[dict]:
    bufs = {fd: bytearray() for _, fd in kids}
    open_fds = set(bufs)
    deadline = time.monotonic() + timeout
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"client processes did not finish within {timeout:.0f}s")
            ready, _, _ = select.select(list(open_fds), [], [], min(left, 1.0))
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    bufs[fd] += chunk
                else:
                    open_fds.discard(fd)
    finally:
        for pid, fd in kids:
            os.close(fd)
            if open_fds:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)
            lab.children.discard(pid)
    out = []
    for _, fd in kids:
        try:
            res = json.loads(bufs[fd])
        except ValueError:
            raise BenchError("a client process died without a result") from None
        if "fatal" in res:
            raise BenchError(f"client process failed: {res['fatal']}")
        out.append(res)
    return out


# ---- client workloads (run in forked children, in the client namespace) -----

def _target(rng: random.Random) -> tuple[str, int]:
    while True:
        port = rng.randint(1, 65535)
        if port != LISTEN_PORT:
            return f"{TARGETS}.{rng.randint(1, 254)}", port


def client_addr(i: int) -> str:
    return f"192.0.2.{2 + i}"


def conn_worker(seed: int, source: str, start: float, warm_until: float, deadline: float) -> dict:
    rng = random.Random(seed)
    ok = errors = mismatches = 0
    counted = 0
    lat_us: list[int] = []
    first_error = ""
    sample = []
    last_use: dict[int, tuple[float, str]] = {}  # local port -> (when, target): for error reports
    while time.monotonic() < start:
        time.sleep(0.001)
    while True:
        t0 = time.monotonic()
        if t0 >= deadline:
            break
        addr, port = _target(rng)
        payload = rng.randbytes(16)
        got = b""
        lport = 0
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                # The port is then chosen at connect(), per destination, as without bind().
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source, 0))
                s.connect((addr, port))
                lport = s.getsockname()[1]
                s.sendall(payload)
                while len(got) < 16:
                    chunk = s.recv(16 - len(got))
                    if not chunk:
                        break
                    got += chunk
        except OSError as exc:
            errors += 1
            if not first_error:
                first_error = f"{addr}:{port} from port {lport}: {exc}"
                if lport in last_use:
                    when, where = last_use[lport]
                    first_error += f" (this worker used port {lport} {(t0 - when) * 1000:.0f} ms earlier, to {where})"
            continue
        t1 = time.monotonic()
        last_use[lport] = (t0, f"{addr}:{port}")
        if got != payload:
            mismatches += 1
            first_error = first_error or f"{addr}:{port}: echo mismatch ({len(got)} bytes back)"
            continue
        ok += 1
        if len(sample) < 5:
            sample.append(f"{addr}:{port}")
        if t0 >= warm_until and t1 <= deadline:
            counted += 1
            lat_us.append(int((t1 - t0) * 1e6))
    return {"ok": ok, "counted": counted, "errors": errors, "mismatches": mismatches,
            "first_error": first_error, "lat_us": lat_us, "sample": sample}


def bulk_worker(seed: int, seconds: float) -> dict:
    rng = random.Random(seed)
    period = 1 << 20
    pattern = rng.randbytes(period)
    stream = pattern + pattern  # any slice up to 1 MiB long is contiguous
    view = memoryview(stream)
    chunk = 1 << 16
    addr, port = _target(rng)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    t_start = time.monotonic()
    s.connect((addr, port))
    sent = [0]
    send_error: list[str] = []
    stop_at = t_start + seconds

    def sender() -> None:
        try:
            n = 0
            while time.monotonic() < stop_at:
                off = n % period
                s.sendall(view[off:off + chunk])
                n += chunk
            sent[0] = n
            s.shutdown(socket.SHUT_WR)  # the listener echoes our EOF back
        except OSError as exc:
            send_error.append(str(exc))

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    buf = bytearray(1 << 18)
    mv = memoryview(buf)
    received = 0
    mismatch_at = -1
    try:
        while True:
            n = s.recv_into(buf)
            if n == 0:
                break
            if mismatch_at < 0 and not stream.startswith(mv[:n], received % period):
                mismatch_at = received
            received += n
    except OSError as exc:
        th.join(5)
        s.close()
        return {"error": f"{addr}:{port}: receiving after {received} bytes: {exc}"}
    t_end = time.monotonic()
    th.join(10)
    s.close()
    return {"target": f"{addr}:{port}", "sent": sent[0], "received": received, "seconds": t_end - t_start,
            "mismatch_at": mismatch_at, "send_error": send_error[0] if send_error else ""}


# ---- the two sides -----------------------------------------------------------

def nftdivert_argv() -> list[str]:
    cli = Path(sys.executable).parent / "nftdivert"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "nftdivert"]


class NftdivertSide:
    name = "nftdivert"

    def __init__(self, lab: Lab, tmp: Path, rnd: int) -> None:
        self.lab, self.tmp, self.rnd = lab, tmp, rnd
        self.cfg = tmp / "nftdivert.toml"
        self.log = tmp / f"conversations-{rnd}.jsonl"
        self.err = tmp / f"nftdivert-{rnd}.stderr"
        self.proc: subprocess.Popen | None = None
        self.backend = self.reason = ""
        self.stats_file = Path("/run/nftdivert") / f"nftdivert-{os.stat(f'/run/netns/{DIVERT_NS}').st_ino}.json"

    def start(self) -> None:
        self.cfg.write_text('# the default config, queue backend left to auto\n[queue]\nbackend = "auto"\n')
        argv = [*nftdivert_argv(), "run", "-c", str(self.cfg), "--log", str(self.log), "--log-format", "json"]
        with open(self.err, "wb") as err:
            self.proc = self.lab.popen(DIVERT_NS, argv, stdout=subprocess.DEVNULL, stderr=err,
                                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.err.read_text(errors="replace")
            m = re.search(r"queue backend (\S+) \((.*)\)", text)
            if m and "diverting unbound ports" in text:
                self.backend, self.reason = m.group(1), m.group(2)
                time.sleep(0.2)
                return
            if self.proc.poll() is not None:
                raise BenchError(f"nftdivert run exited {self.proc.returncode} while starting:\n{text.strip()}")
            time.sleep(0.05)
        raise BenchError(f"nftdivert run not ready after 30s:\n{self.err.read_text(errors='replace').strip()}")

    def counters(self, after_wall: float | None = None) -> dict | None:
        """The worker's counters from its stats file (written once a second)."""
        deadline = time.monotonic() + 3
        while True:
            try:
                snap = json.loads(self.stats_file.read_text())
                if after_wall is None or snap["updated"] > after_wall:
                    return snap["packets"]
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def stop(self) -> dict:
        assert self.proc is not None
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BenchError("nftdivert run did not stop within 20s of SIGTERM") from None
        text = self.err.read_text(errors="replace")
        if rc != 0:
            raise BenchError(f"nftdivert run exited {rc}:\n{text.strip()}")
        m = re.search(r"packets seen (\d+), rewritten (\d+), passed (\d+), malformed (\d+), errors (\d+)", text)
        names = ("seen", "rewritten", "passed", "malformed", "errors")
        final = dict(zip(names, map(int, m.groups()), strict=True)) if m else {}
        if final.get("errors"):
            raise BenchError(f"nftdivert counted {final['errors']} packet errors: {m.group(0)}")
        # It must leave nothing behind in the diverter.
        if "nftdivert" in in_ns(DIVERT_NS, "nft", "list", "tables", check=False):
            raise BenchError("nftdivert's table is still loaded after it stopped")
        log_tcp = 0
        targets = set()
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("protocol") == "tcp":
                    log_tcp += 1
                    targets.add(rec.get("original_destination"))
        return {"final": final, "log_tcp_conversations": log_tcp, "log_targets": targets}


class KernelSide:
    name = "kernel"

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        in_ns(DIVERT_NS, "nft", "-f", "-", input=REF_TABLE)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = self.lab.popen(DIVERT_NS, [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.proc.kill()
            raise BenchError(f"echo server did not start: {self.proc.stderr.read().decode(errors='replace')}")

    def counters(self, after_wall: float | None = None) -> None:
        return None

    def stop(self) -> dict:
        assert self.proc is not None
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BenchError("echo server did not stop within 15s") from None
        in_ns(DIVERT_NS, "nft", "delete", "table", "inet", "ref")
        if self.proc.returncode != 0:
            raise BenchError(f"echo server exited {self.proc.returncode}: {err.decode(errors='replace')}")
        return {}


# ---- measurement phases --------------------------------------------------------

def measure_conns(lab: Lab, args, rng: random.Random) -> dict:
    warm = min(0.5, args.seconds * 0.1)
    start = time.monotonic() + 0.2
    deadline = start + args.seconds
    kids = [fork_in_client(lab, conn_worker, rng.getrandbits(64),
                           client_addr(i) if args.address_per_worker else CLIENT_ADDR,
                           start, start + warm, deadline)
            for i in range(args.workers)]
    res = collect(lab, kids, timeout=args.seconds + 60)
    errors = sum(r["errors"] for r in res)
    mismatches = sum(r["mismatches"] for r in res)
    counted = sum(r["counted"] for r in res)
    lat = sorted(x for r in res for x in r["lat_us"])
    first = next((r["first_error"] for r in res if r["first_error"]), "")
    if errors or mismatches:
        raise BenchError(f"{errors} connection errors, {mismatches} echo mismatches (first: {first})")
    if not counted:
        raise BenchError("no connection completed in the measurement window")

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000

    return {"conn_per_s": counted / (args.seconds - warm), "connections": sum(r["ok"] for r in res),
            "lat_p50_ms": pct(0.50), "lat_p99_ms": pct(0.99),
            "sample": [t for r in res for t in r["sample"]]}


def measure_bulk(lab: Lab, args, rng: random.Random) -> dict:
    [res] = collect(lab, [fork_in_client(lab, bulk_worker, rng.getrandbits(64), args.seconds)],
                    timeout=args.seconds + 60)
    if "error" in res:
        raise BenchError(f"bulk: {res['error']}")
    if res["send_error"]:
        raise BenchError(f"bulk: sending to {res['target']}: {res['send_error']}")
    if res["received"] != res["sent"] or res["mismatch_at"] >= 0:
        raise BenchError(f"bulk echo mismatch via {res['target']}: sent {res['sent']} bytes, got back "
                         f"{res['received']}, first differing chunk at {res['mismatch_at']}")
    return {"mb_per_s": res["received"] / res["seconds"] / 1e6, "bytes": res["received"],
            "seconds": res["seconds"]}


def flush_conntrack() -> None:
    if shutil.which("conntrack"):
        in_ns(DIVERT_NS, "conntrack", "-F", check=False)


def run_side(side, args, rng: random.Random, results: dict, rnd: int) -> None:
    say(f"round {rnd + 1}: {side.name}: starting")
    flush_conntrack()
    side.start()
    if isinstance(side, NftdivertSide):
        results["backend"], results["backend_reason"] = side.backend, side.reason
    before = side.counters()
    say(f"round {rnd + 1}: {side.name}: connections for {args.seconds:g}s ({args.workers} workers)")
    conns = measure_conns(side.lab, args, rng)
    after = side.counters(after_wall=time.time())
    if before and after:  # traffic ran for --seconds (its warm-up included)
        conns["queued_packets"] = after["seen"] - before["seen"]
        conns["queued_pkt_per_s"] = conns["queued_packets"] / args.seconds
        conns["queued_packets_per_conn"] = conns["queued_packets"] / max(1, conns["connections"])
    say(f"round {rnd + 1}: {side.name}: {conns['conn_per_s']:.0f} conn/s, p50 {conns['lat_p50_ms']:.2f} ms")
    flush_conntrack()
    say(f"round {rnd + 1}: {side.name}: bulk echo for {args.seconds:g}s")
    before = after
    bulk = measure_bulk(side.lab, args, rng)
    after = side.counters(after_wall=time.time())
    if before and after:
        bulk["queued_packets"] = after["seen"] - before["seen"]
        bulk["queued_pkt_per_s"] = bulk["queued_packets"] / bulk["seconds"]
        bulk["bytes_per_queued_packet"] = 2 * bulk["bytes"] / max(1, bulk["queued_packets"])
    say(f"round {rnd + 1}: {side.name}: {bulk['mb_per_s']:.1f} MB/s echoed")
    info = side.stop()
    if isinstance(side, NftdivertSide):
        missing = [t for t in conns["sample"] if t not in info["log_targets"]]
        if info["log_tcp_conversations"] == 0:
            raise BenchError("nftdivert logged no diverted TCP conversation")
        if missing:
            say(f"note: {len(missing)} sampled targets not (yet) in the conversation log, e.g. {missing[0]}")
        conns["log_tcp_conversations"] = info["log_tcp_conversations"]
        conns["worker_final"] = info["final"]
    conns.pop("sample")
    results["rounds"].append({"round": rnd + 1, "side": side.name, "conn": conns, "bulk": bulk})


# ---- the worker's cost per packet, in-process ---------------------------------------

def micro(iterations: int, reps: int) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    import ipaddress
    import queue

    import builders
    from nftdivert.config import Config
    from nftdivert.packet import ACK, SYN, TCP, UDP
    from nftdivert.worker import build_fixup, new_conversation_event

    cfg = Config()
    bound_ports = {LISTEN_PORT, 22}  # the worker's is_bound: a set lookup, as in runner._BoundPorts
    events: queue.SimpleQueue = queue.SimpleQueue()

    def fresh():
        # on_new as `nftdivert run` wires it: build the log event, hand it to the log thread.
        return build_fixup(cfg, lambda proto, port: port in bound_ports,
                           on_new=lambda conv: events.put(new_conversation_event(cfg, conv)))

    local = ipaddress.ip_address(DIVERT_ADDR).packed  # after `redirect`: the diverter's address
    psh = 0x08
    syn_opts = bytes.fromhex("020405b4" "0402" "080a0000000100000000" "01" "030307")  # MSS SACK TS NOP WS
    ts_opts = bytes.fromhex("0101080a0000000200000001")  # NOP NOP TS

    def client(i: int) -> bytes:
        return ipaddress.ip_address(f"192.0.2.{2 + i // 60000}").packed

    def cport(i: int) -> int:
        return 1024 + i % 60000

    def orig(i: int) -> int:
        return 2000 + (i * 7919) % 60000

    def inc(i, flags, payload=b"", opts=ts_opts):
        return builders.packet(4, TCP, client(i), local, cport(i), orig(i), payload, flags=flags, options=opts)

    def out(i, flags, payload=b"", opts=ts_opts):
        return builders.packet(4, TCP, local, client(i), LISTEN_PORT, cport(i), payload, flags=flags, options=opts)

    n_syn = iterations
    n_conv = 1000
    say(f"micro: building {n_syn + 6 * n_conv} packets")
    syns = [inc(i, SYN, opts=syn_opts) for i in range(n_syn)]
    # One UDP socket scanning ports: every datagram a new conversation from the
    # same client port, so each needs a free alias port at the listener.
    scan = [builders.packet(4, UDP, client(0), local, 5353, 2000 + i, b"probe") for i in range(n_syn)]
    openers = {"in_syn_new": syns, "in_udp_scan_new": scan}
    kinds = {
        "in_syn_new": None,
        "in_udp_scan_new": None,
        "out_synack": [out(i, SYN | ACK, opts=syn_opts) for i in range(n_conv)],
        "in_ack": [inc(i, ACK) for i in range(n_conv)],
        "in_data_64": [inc(i, ACK | psh, bytes(64)) for i in range(n_conv)],
        "in_data_1400": [inc(i, ACK | psh, bytes(1400)) for i in range(n_conv)],
        "out_data_64": [out(i, ACK | psh, bytes(64)) for i in range(n_conv)],
        "out_data_1400": [out(i, ACK | psh, bytes(1400)) for i in range(n_conv)],
    }
    results = {}
    now = time.monotonic()
    for kind, pkts in kinds.items():
        times = []
        for _ in range(reps):
            fx = fresh()
            if pkts is None:  # every packet opens a conversation the table has not seen
                batch, fn = openers[kind], fx.incoming
            else:
                for p in syns[:n_conv]:  # the conversations these packets belong to
                    fx.incoming(p, now)
                batch = pkts * max(1, iterations // n_conv)
                fn = fx.incoming if kind.startswith("in_") else fx.outgoing
            c0 = fx.counters.rewritten
            t0 = time.perf_counter()
            for p in batch:
                fn(p, now)
            dt = time.perf_counter() - t0
            c = fx.counters
            if c.rewritten - c0 != len(batch) or c.errors or c.malformed:
                raise BenchError(f"micro {kind}: {len(batch)} packets, {c.rewritten - c0} rewritten, "
                                 f"{c.errors} errors ({fx.last_error!r}), {c.malformed} malformed")
            times.append(dt / len(batch) * 1e6)
            while not events.empty():
                events.get_nowait()
        # Best of the repetitions: other load on the machine only ever adds time.
        us = min(times)
        results[kind] = {"us_per_packet": us, "median_us": statistics.median(times), "packets_per_s": 1e6 / us,
                         "iterations": len(batch), "reps": reps}
        say(f"micro: {kind}: {us:.2f} us/packet")
    # A sanity check of the rewrite itself: the port and a valid checksum.
    fx = fresh()
    new = fx.incoming(syns[0], now)
    if new is None or int.from_bytes(new[22:24], "big") != LISTEN_PORT or not builders.checksum_valid(new):
        raise BenchError("micro: the SYN was not rewritten to the listener with a valid checksum")
    return results


# ---- report --------------------------------------------------------------------

MICRO_LABELS = {
    "in_syn_new": "FixUp.incoming  SYN, new conversation",
    "in_udp_scan_new": "FixUp.incoming  UDP, new, same client port",
    "out_synack": "FixUp.outgoing  SYN-ACK reply (announces it)",
    "in_ack": "FixUp.incoming  ACK, no data",
    "in_data_64": "FixUp.incoming  data, 64 B",
    "in_data_1400": "FixUp.incoming  data, 1400 B",
    "out_data_64": "FixUp.outgoing  reply data, 64 B",
    "out_data_1400": "FixUp.outgoing  reply data, 1400 B",
}


def mean(xs):
    return statistics.fmean(xs) if xs else None


def summarize(res: dict) -> dict:
    rows = {}
    for key, path, fmt in (("conn_per_s", ("conn", "conn_per_s"), "{:,.0f}"),
                           ("conn_latency_p50_ms", ("conn", "lat_p50_ms"), "{:.2f}"),
                           ("conn_latency_p99_ms", ("conn", "lat_p99_ms"), "{:.2f}"),
                           ("bulk_echo_mb_per_s", ("bulk", "mb_per_s"), "{:,.1f}")):
        vals = {side: [r[path[0]][path[1]] for r in res["rounds"] if r["side"] == side]
                for side in ("nftdivert", "kernel")}
        a, b = mean(vals["nftdivert"]), mean(vals["kernel"])
        rows[key] = {"nftdivert": a, "kernel": b, "ratio": a / b if a and b else None,
                     "per_round": vals, "fmt": fmt}
    return rows


def print_report(res: dict, rows: dict, args) -> None:
    labels = {"conn_per_s": f"connections/s (16 B echo, {args.workers} workers)",
              "conn_latency_p50_ms": "connection latency p50 (ms)",
              "conn_latency_p99_ms": "connection latency p99 (ms)",
              "bulk_echo_mb_per_s": "bulk echo MB/s (1 conn, echoed bytes)"}
    m = res["machine"]
    print(f"\nnftdivert benchmark: {m['cores']} cores, Linux {m['kernel']} {m['arch']}, Python {m['python']}")
    print(f"queue backend: {res.get('backend', '?')} ({res.get('backend_reason', '')})")
    print(f"{args.rounds} rounds (ABBA order), {args.seconds:g}s per phase; mean of rounds\n")
    w = 50
    print(f"{'metric':<{w}} {'nftdivert':>12} {'kernel-only':>12} {'ratio':>7}")
    print("-" * (w + 34))
    for key, row in rows.items():
        f = row["fmt"]
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        print(f"{labels[key]:<{w}} {f.format(row['nftdivert']):>12} {f.format(row['kernel']):>12} {ratio:>7}")
    nd = [r for r in res["rounds"] if r["side"] == "nftdivert"]
    qc = mean([r["conn"]["queued_pkt_per_s"] for r in nd if "queued_pkt_per_s" in r["conn"]])
    ppc = mean([r["conn"]["queued_packets_per_conn"] for r in nd if "queued_packets_per_conn" in r["conn"]])
    qb = mean([r["bulk"]["queued_pkt_per_s"] for r in nd if "queued_pkt_per_s" in r["bulk"]])
    if qc is not None:
        print(f"{'queued packets/s, connections phase':<{w}} {qc:>12,.0f} {'-':>12} {'-':>7}")
        print(f"{'queued packets per connection':<{w}} {ppc:>12.1f} {'-':>12} {'-':>7}")
    if qb is not None:
        print(f"{'queued packets/s, bulk phase':<{w}} {qb:>12,.0f} {'-':>12} {'-':>7}")
    print(f"\n{'worker cost in-process (us/packet; 1e6/us = packets/s)':<{w}} {'us/pkt':>12} {'pkt/s':>12}")
    print("-" * (w + 34))
    for kind, r in res["micro"].items():
        print(f"{MICRO_LABELS[kind]:<{w}} {r['us_per_packet']:>12.2f} {r['packets_per_s']:>12,.0f}")
    print(f"\nresults: {args.json}; run time {res['duration_s']:.1f}s")


# ---- main ----------------------------------------------------------------------

def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nftdivert vs. kernel-only redirect, side by side (needs root).")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement phase (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, sides alternating ABBA (default 2)")
    ap.add_argument("--workers", type=int, default=4, help="parallel connection workers (default 4)")
    ap.add_argument("--address-per-worker", action="store_true",
                    help="give each worker its own client address (default: all share one, as a real client "
                         "does; concurrent connections then often share a client port, which nftdivert "
                         "must tell apart by their original destination)")
    ap.add_argument("--micro-iterations", type=int, default=30000, help="packets per micro timing (default 30000)")
    ap.add_argument("--micro-reps", type=int, default=5, help="repetitions per micro timing, best kept (default 5)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for targets and payloads")
    ap.add_argument("--json", default="bench-results.json",
                    help="write all numbers here (default: ./bench-results.json)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or not 1 <= args.workers <= 200 or args.micro_iterations < 1000:
        ap.error("--seconds > 0, --rounds >= 1, --workers 1-200, --micro-iterations >= 1000")
    if os.geteuid() != 0:
        print("divert_bench: must run as root (it creates network namespaces and nftables tables)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        print(f"divert_bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)

    lab = Lab(args.workers if args.address_per_worker else 1)
    atexit.register(lab.close)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    u = os.uname()
    res: dict = {"machine": {"cores": os.cpu_count(), "kernel": u.release, "arch": u.machine,
                             "python": platform.python_version(), "hostname": u.nodename},
                 "settings": {"seconds": args.seconds, "rounds": args.rounds, "workers": args.workers,
                              "address_per_worker": args.address_per_worker,
                              "micro_iterations": args.micro_iterations, "micro_reps": args.micro_reps,
                              "seed": seed},
                 "rounds": [], "ok": False}
    status = 1
    tmp = Path(tempfile.mkdtemp(prefix=f"ndb-{MAIN_PID}-"))
    try:
        say(f"machine: {os.cpu_count()} cores, Linux {u.release}; seed {seed}")
        res["micro"] = micro(args.micro_iterations, args.micro_reps)
        stale_namespaces()
        say(f"creating namespaces {CLIENT_NS}, {DIVERT_NS}")
        lab.up()
        for rnd in range(args.rounds):
            sides = [NftdivertSide(lab, tmp, rnd), KernelSide(lab)]
            for side in (sides if rnd % 2 == 0 else sides[::-1]):
                run_side(side, args, rng, res, rnd)
        res["ok"] = True
        status = 0
    except BenchError as exc:
        res["error"] = str(exc)
        print(f"divert_bench: FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        res["error"] = f"interrupted ({exc or 'SIGINT'})"
        print("divert_bench: interrupted, cleaning up", file=sys.stderr)
        status = 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = time.monotonic() - T0
    rows = summarize(res) if res["ok"] else {}
    res["results"] = {k: {kk: vv for kk, vv in v.items() if kk != "fmt"} for k, v in rows.items()}
    try:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    except OSError as exc:
        print(f"divert_bench: cannot write {args.json}: {exc}", file=sys.stderr)
        status = status or 1
    if res["ok"]:
        print_report(res, rows, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
