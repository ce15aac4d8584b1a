"""Load generators: client processes forked into the client namespace.

Each worker runs in a child of its own (no shared GIL with the parent or
the other workers) and hands back one JSON dict through a pipe.

  conn  connect to a random 198.51.100.x:port, send 16 bytes, read the
        16-byte echo, compare, close; repeat
  bulk  --bulk-streams connections at once, one per process: a sender thread
        streams for --seconds, the receiver reads the echo concurrently and
        compares every byte
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import threading
import time

from common import NOT_ECHOED, BenchError
from topology import CLIENT_ADDR, LISTEN_PORT, TARGETS, Topology, client_addr

from nftdivert.lab.netns import Netns

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_children: set[int] = set()  # forked workers not yet reaped


def fork_in(ns: Netns, fn, *args) -> tuple[int, int]:
    """Run fn(*args) -> dict in a child process inside `ns`; (pid, read fd)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            ns.enter()
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
    _children.add(pid)
    return pid, r


def collect(kids: list[tuple[int, int]], timeout: float) -> list[dict]:
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
            _children.discard(pid)
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


def kill_children() -> None:
    """Workers still running when the benchmark stops: killed and reaped."""
    for pid in list(_children):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        _children.discard(pid)


# ---- the workers (run in forked children, in the client namespace) ----------

def _target(rng: random.Random) -> tuple[str, int]:
    while True:
        port = rng.randint(1, 65535)
        if port != LISTEN_PORT and port not in NOT_ECHOED:
            return f"{TARGETS}.{rng.randint(1, 254)}", port


def echo_payload(rng: random.Random) -> bytes:
    """16 bytes the listener echoes: hex digits, which no protocol's first bytes match.

    Random bytes were not: about 1 in 65,536 begins like a SOCKS5 greeting
    (version 5, then 14 methods: exactly the 14 bytes that follow), and the
    listener rightly answered that as a proxy, not an echo: a lost
    connection in a row, the kernel's own included, about once a run.
    """
    return rng.randbytes(8).hex().encode()


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
        payload = echo_payload(rng)
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


def bulk_worker(seed: int, start: float, seconds: float) -> dict:
    rng = random.Random(seed)
    period = 1 << 20
    pattern = rng.randbytes(period)
    stream = pattern + pattern  # any slice up to 1 MiB long is contiguous
    view = memoryview(stream)
    chunk = 1 << 16
    addr, port = _target(rng)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(20)
    while time.monotonic() < start:  # the streams start together
        time.sleep(0.001)
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
    return {"target": f"{addr}:{port}", "sent": sent[0], "received": received, "t_start": t_start, "t_end": t_end,
            "mismatch_at": mismatch_at, "send_error": send_error[0] if send_error else ""}


# ---- the two phases: start the workers, check and sum up their results -------

def measure_conns(topo: Topology, args, rng: random.Random) -> dict:
    warm = min(0.5, args.seconds * 0.1)
    start = time.monotonic() + 0.2
    deadline = start + args.seconds
    kids = [fork_in(topo.client, conn_worker, rng.getrandbits(64),
                    client_addr(i) if args.address_per_worker else CLIENT_ADDR,
                    start, start + warm, deadline)
            for i in range(args.workers)]
    res = collect(kids, timeout=args.seconds + 60)
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


def measure_bulk(topo: Topology, args, rng: random.Random) -> dict:
    """MB/s of all streams together: bytes echoed back / (first connect .. last echo EOF)."""
    start = time.monotonic() + 0.2
    kids = [fork_in(topo.client, bulk_worker, rng.getrandbits(64), start, args.seconds)
            for _ in range(args.bulk_streams)]
    results = collect(kids, timeout=args.seconds + 60)
    for res in results:
        if "error" in res:
            raise BenchError(f"bulk: {res['error']}")
        if res["send_error"]:
            raise BenchError(f"bulk: sending to {res['target']}: {res['send_error']}")
        if res["received"] != res["sent"] or res["mismatch_at"] >= 0:
            raise BenchError(f"bulk echo mismatch via {res['target']}: sent {res['sent']} bytes, got back "
                             f"{res['received']}, first differing chunk at {res['mismatch_at']}")
    received = sum(r["received"] for r in results)
    seconds = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
    return {"mb_per_s": received / seconds / 1e6, "bytes": received, "seconds": seconds, "streams": len(results),
            "stream_mb_per_s": [r["received"] / (r["t_end"] - r["t_start"]) / 1e6 for r in results]}
