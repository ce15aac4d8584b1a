#!/usr/bin/env python3
"""Where the queue path's time goes, per queued packet and per connection, beside the kernel alone.

In the benchmark's two namespaces (topology.py), with the benchmark's
connection load (load.py), it runs `nftdivert run` quiet (no log, no pcap)
and the kernel-only redirect (sides.py) in turns, and reports per round:

  conn/s and their ratio       the figure `make bench` compares, same run
  CPU per connection           the machine (/proc/stat), the clients, each
                               process in the diverter's namespace, each
                               thread of the worker's process; and the
                               ratio of the bench's own CPU per connection
                               (steadier than conn/s on a shared machine)
  worker thread CPU per packet without timers on the path (the default);
                               with --split, timed in parts on the thread's
                               CPU clock (the timers, about a dozen clock
                               reads per packet, add their own cost):
      recv        the netlink receive (one message, one packet)
      dispatch    NetfilterQueue parsing the message, making the Packet,
                  calling back (the drain's time minus recv and callback)
      get_payload the copy out of the message
      fixup       FixUp.incoming / outgoing (parse, table, rewrite)
      set_payload handing the new bytes back
      verdict     the verdict's netlink send; the kernel goes on with the
                  packet inside this call (the rest of its hooks, the
                  socket it reaches, the reply that may queue)
      callback    the callbacks' own Python around these
      other       the thread's CPU outside them (epoll, the loop, the tick)

The worker is measured by patching its methods in the `nftdivert run` child
(this file with --probe). Experiments: QUEUE_PROFILE_NO_ORIGIN=1 makes the
listener ask nothing about a conversation's original destination, and
QUEUE_PROFILE_NO_CONNTRACK=1 answers it from the worker's table alone (the
port right, the address the local one); QUEUE_PROFILE_CPROFILE=FILE
profiles the worker thread.

`--in-process` needs no root: the worker's callbacks and FixUp behind them
on the packets of whole connections, with a stand-in for NetfilterQueue's
packet, in us per packet, Python calls and bytecodes per packet (the last
two do not move with the machine's load).

Run as root:  .venv/bin/python bench/queue_profile.py [--seconds 5] [--rounds 2] [--split] [--json FILE]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# ---- the child: `nftdivert run` with a timed worker ---------------------------

def probe(out: str, split: bool, argv: list[str]) -> None:
    """Run the nftdivert CLI with the worker's hot path timed; the totals go to `out` on each tick and at exit.

    Without `split`, only the worker thread's CPU and its packets are counted
    (no timers on the path). With it, each part is timed on the thread's CPU
    clock (a wait for the GIL or for a core is not counted); the packet the
    callbacks get is wrapped to time its methods, which adds its own cost."""
    import threading

    from nftdivert import cli
    from nftdivert.worker import fixup as fx
    from nftdivert.worker import queue as q

    ns = time.thread_time_ns
    tot = dict.fromkeys(("recv", "drain", "callback", "get_payload", "fixup", "set_payload", "verdict"), 0)
    cnt = {"packets": 0, "drains": 0, "recv_eagain": 0, "cpu_ns": 0, "tick_ns": 0}

    def dump():
        names = {t.native_id: t.name for t in threading.enumerate()}
        Path(out).write_text(json.dumps({"totals_ns": tot, "counts": cnt, "threads": names}))

    orig_init = q.Worker.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        inner = self.tick

        def tick(now):  # in the worker thread
            t = time.thread_time_ns()
            cnt["cpu_ns"] = t
            cnt["packets"] = self.fixup.counters.seen
            dump()
            if inner is not None:
                inner(now)
            cnt["tick_ns"] += time.thread_time_ns() - t
        self.tick = tick
    q.Worker.__init__ = init
    atexit.register(dump)
    if split:
        _timed(q, fx, ns, tot, cnt)
    from nftdivert.services import origin
    if os.environ.get("QUEUE_PROFILE_NO_ORIGIN"):  # experiment: the listener asks nothing
        origin.Client.ask = lambda self, client, local: None
    if os.environ.get("QUEUE_PROFILE_NO_CONNTRACK"):  # experiment: answered from the table alone
        table_only = origin.original
        origin.original = lambda table, _entry, client, local: table_only(table, None, client, local)
    if os.environ.get("QUEUE_PROFILE_CPROFILE"):  # a function-level profile of the worker thread
        import cProfile
        orig_run = q.Worker.run

        def run(self):
            prof = cProfile.Profile()
            try:
                return prof.runcall(orig_run, self)
            finally:
                prof.dump_stats(os.environ["QUEUE_PROFILE_CPROFILE"])
        q.Worker.run = run
    cli.main(argv)


def _timed(q, fx, ns, tot: dict, cnt: dict) -> None:
    """Wrap the worker's steps with timers that add to `tot` (ns) and `cnt`."""
    orig_recv, orig_drain = q._BoundedSocket.recv, q._BoundedSocket.drain

    def recv(self, size):
        t = ns()
        try:
            return orig_recv(self, size)
        except BlockingIOError:
            cnt["recv_eagain"] += self.left > 0  # the kernel's, not the drain bound's
            raise
        finally:
            tot["recv"] += ns() - t

    def drain(self, nfq, bound):
        t = ns()
        try:
            return orig_drain(self, nfq, bound)
        finally:
            tot["drain"] += ns() - t
            cnt["drains"] += 1

    class Timed:
        """The packet, its methods timed."""

        __slots__ = ("pkt",)

        def __init__(self, pkt):
            self.pkt = pkt

        @property
        def indev(self):
            return self.pkt.indev

        def get_payload(self):
            t = ns()
            data = self.pkt.get_payload()
            tot["get_payload"] += ns() - t
            return data

        def set_payload(self, data):
            t = ns()
            self.pkt.set_payload(data)
            tot["set_payload"] += ns() - t

        def accept(self):
            t = ns()
            self.pkt.accept()
            tot["verdict"] += ns() - t

        def drop(self):
            t = ns()
            self.pkt.drop()
            tot["verdict"] += ns() - t

    def callback(orig):
        def make(self, incoming):
            inner = orig(self, incoming)

            def timed(pkt):
                t = ns()
                inner(Timed(pkt))
                tot["callback"] += ns() - t
            return timed
        return make

    def fixup(orig):
        def timed(self, *a, **kw):
            t = ns()
            try:
                return orig(self, *a, **kw)
            finally:
                tot["fixup"] += ns() - t
        return timed

    q._BoundedSocket.recv, q._BoundedSocket.drain = recv, drain
    q.Worker._callback = callback(q.Worker._callback)
    fx.FixUp.incoming, fx.FixUp.outgoing = fixup(fx.FixUp.incoming), fixup(fx.FixUp.outgoing)


# ---- in-process: the worker's Python per packet, without the kernel -------------

def in_process(conns: int, reps: int) -> dict:
    """The worker's callbacks (and FixUp behind them) on the packets of `conns`
    whole connections as the bench makes them (SYN, SYN-ACK, ACK, 16 bytes
    each way, FIN both ways: 6 incoming, 4 outgoing), through a stand-in for
    NetfilterQueue's packet. Best of `reps`, in us per packet."""
    import ipaddress

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import builders
    from nftdivert.config import Config
    from nftdivert.worker.packet import ACK, FIN, SYN, TCP
    from nftdivert.worker.queue import Worker, build_fixup

    psh, listen = 0x08, 1337
    client = ipaddress.ip_address("192.0.2.2").packed
    local = ipaddress.ip_address("192.0.2.1").packed
    opts = bytes.fromhex("0101080a0000000200000001")

    def pkt(incoming, i, flags, payload=b""):
        cport, orig = 1024 + i % 60000, 2000 + (i * 7919) % 60000
        if incoming:
            return True, builders.packet(4, TCP, client, local, cport, orig, payload, flags=flags, options=opts)
        return False, builders.packet(4, TCP, local, client, listen, cport, payload, flags=flags, options=opts)

    seq = []
    for i in range(conns):
        seq += [pkt(True, i, SYN), pkt(False, i, SYN | ACK), pkt(True, i, ACK), pkt(True, i, ACK | psh, bytes(16)),
                pkt(False, i, ACK | psh, bytes(16)), pkt(True, i, ACK), pkt(True, i, FIN | ACK),
                pkt(False, i, FIN | ACK), pkt(True, i, ACK), pkt(False, i, ACK)]

    class Packet:
        """What the callbacks use of NetfilterQueue's Packet."""

        __slots__ = ("data", "new", "verdict")
        indev = 2

        def __init__(self, data):
            self.data, self.new, self.verdict = data, None, None

        def get_payload(self):
            return self.data

        def set_payload(self, new):
            self.new = new

        def accept(self):
            self.verdict = "accept"

        def drop(self):
            self.verdict = "drop"

    cfg = Config()
    counts = {"call": 0, "opcode": 0}

    def trace(frame, event, _arg):  # counts Python calls and bytecodes: a measure the machine's load cannot move
        counts[event] = counts.get(event, 0) + 1
        frame.f_trace_opcodes = True
        return trace

    best = float("inf")
    for rep in range(reps + 1):
        worker = Worker(cfg, build_fixup(cfg, lambda proto, addr, port: port == listen))
        worker._now = time.monotonic()
        callbacks = {True: worker._callback(True), False: worker._callback(False)}
        packets = [(callbacks[inc], Packet(data)) for inc, data in seq]
        if rep == reps:  # the last round counts, untimed
            sys.settrace(trace)
        t0 = time.perf_counter()
        for callback, p in packets:
            callback(p)
        dt = time.perf_counter() - t0
        sys.settrace(None)
        if rep < reps:
            best = min(best, dt / len(packets) * 1e6)
        c = worker.fixup.counters
        worker.close()
        if c.rewritten != len(packets) or any(p.verdict != "accept" or p.new is None for _, p in packets):
            raise SystemExit(f"in-process: {c.rewritten} of {len(packets)} rewritten, errors {c.errors} "
                             f"({worker.fixup.last_error!r})")
    return {"us_per_packet": best, "packets": len(seq), "reps": reps,
            "calls_per_packet": counts["call"] / len(seq), "bytecodes_per_packet": counts["opcode"] / len(seq)}


# ---- the parent: sides, load, CPU accounting ------------------------------------

def _cpu_jiffies() -> dict[str, int]:
    """Machine-wide CPU time by kind, in clock ticks."""
    cols = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in cols[:7])
    return {"user": user + nice, "system": system + irq, "softirq": softirq, "idle": idle + iowait}


def _proc_cpu(pid: int, stat: str = "") -> float:
    """A process's user + system CPU seconds (all its threads), or one thread's from its `stat`."""
    f = Path(stat or f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of a process, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = _proc_cpu(int(task.name), f"/proc/{pid}/task/{task.name}/stat")
        except OSError:
            continue
    return out


def _ns_cpu(ns) -> dict[str, float]:
    """CPU seconds of each process inside a namespace, by pid and a short command."""
    out = {}
    for pid in ns.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            out[f"{pid} {' '.join(Path(c.decode()).name.splitlines()[0][:30] for c in cmd[1:4] if c)}"] = \
                _proc_cpu(pid)
        except OSError:
            continue
    return out


def phase(side, topo, args, rng, probe_out: Path | None) -> dict:
    import load

    topo.flush_conntrack()
    side.start()
    pid = side.proc.pid if probe_out else None  # `ip netns exec` exec()s the command
    time.sleep(1.2)  # a tick: the probe's first dump
    before = json.loads(probe_out.read_text()) if probe_out else None
    j0, p0 = _cpu_jiffies(), (_proc_cpu(pid) if pid else 0.0)
    t0 = _threads_cpu(pid) if pid else {}
    n0 = _ns_cpu(topo.divert)
    c0 = os.times()
    perf = None
    if args.perf:  # the whole machine: the queue moves kernel work between processes
        import subprocess
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "1999", "-a", "-g", "-o",
                                 f"{args.perf}.{'queue' if pid else 'kernel'}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conns = load.measure_conns(topo, args, rng)
    if perf is not None:
        perf.send_signal(2)
        perf.wait()
    j1, p1 = _cpu_jiffies(), (_proc_cpu(pid) if pid else 0.0)
    t1 = _threads_cpu(pid) if pid else {}
    n1 = _ns_cpu(topo.divert)
    c1 = os.times()  # the load's client processes, reaped by now
    time.sleep(1.2)
    after = json.loads(probe_out.read_text()) if probe_out else None
    side.stop()
    n = conns["connections"]
    tick = os.sysconf("SC_CLK_TCK")
    res = {"conn_per_s": conns["conn_per_s"], "connections": n, "lat_p50_ms": conns["lat_p50_ms"],
           "machine_cpu_us_per_conn": {k: (j1[k] - j0[k]) / tick * 1e6 / n for k in j0},
           "processes_cpu_us_per_conn": {k: (n1[k] - n0.get(k, 0.0)) * 1e6 / n for k in n1},
           "clients_cpu_us_per_conn": (c1.children_user + c1.children_system - c0.children_user
                                       - c0.children_system) * 1e6 / n}
    if probe_out:
        res["worker_cpu_us_per_conn"] = (p1 - p0) * 1e6 / n
        names = after.get("threads", {})  # thread id -> Python's name for it
        res["worker_threads_cpu_us_per_conn"] = {names.get(k, k): (t1[k] - t0.get(k, 0.0)) * 1e6 / n
                                                 for k in t1 if t1[k] > t0.get(k, 0.0)}
        res["worker"] = _split(before, after)
    return res


def _split(before: dict, after: dict) -> dict:
    t = {k: after["totals_ns"][k] - before["totals_ns"][k] for k in after["totals_ns"]}
    c = {k: after["counts"][k] - before["counts"][k] for k in after["counts"]}
    pk = max(1, c["packets"])
    res = {"packets": c["packets"], "thread_cpu_us_per_packet": c["cpu_ns"] / pk / 1000,
           "tick_cpu_us_per_packet": c["tick_ns"] / pk / 1000}
    if c["drains"]:  # the parts were timed
        steps = ("get_payload", "fixup", "set_payload", "verdict")
        parts = {"recv": t["recv"], "dispatch": t["drain"] - t["recv"] - t["callback"],
                 **{k: t[k] for k in steps}, "callback": t["callback"] - sum(t[k] for k in steps)}
        parts["other"] = c["cpu_ns"] - sum(parts.values())
        res.update(packets_per_drain=c["packets"] / c["drains"], empty_recv_per_packet=c["recv_eagain"] / pk,
                   us_per_packet={k: v / pk / 1000 for k, v in parts.items()})
    return res


def _queue_side(sides, topo, tmp: Path, rnd: int):
    """`nftdivert run` on the queue path, quiet; sides.py names the path once it has two."""
    import inspect

    if "path" in inspect.signature(sides.NftdivertSide).parameters:
        return sides.NftdivertSide(topo, tmp, rnd, "queue")
    return sides.NftdivertSide(topo, tmp, rnd, ())


def main() -> int:
    if len(sys.argv) > 3 and sys.argv[1] == "--probe":
        probe(sys.argv[3], sys.argv[2] == "split", sys.argv[4:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--in-process":
        res = in_process(3000, 15)
        print(f"in-process: worker callbacks + FixUp, {res['us_per_packet']:.2f} us/packet "
              f"(best of {res['reps']}, {res['packets']} packets of whole connections); "
              f"{res['calls_per_packet']:.1f} Python calls, {res['bytecodes_per_packet']:.0f} bytecodes per packet")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import load
    import sides
    import topology
    from common import say

    ap = argparse.ArgumentParser(description="Where the queue path's time goes per packet (needs root).")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", default="")
    ap.add_argument("--split", action="store_true",
                    help="time each part of the worker's path (adds timers to it); default: its total CPU only")
    ap.add_argument("--perf", default="", help="perf record the machine during each load, to FILE.queue and FILE.kernel")
    args = ap.parse_args()
    args.address_per_worker = False
    if os.geteuid() != 0:
        print("queue_profile: must run as root", file=sys.stderr)
        return 2
    rng = random.Random(1)
    topo = topology.Topology(1)
    tmp = Path(tempfile.mkdtemp(prefix=f"nqp-{os.getpid()}-"))
    main_pid = os.getpid()

    def cleanup():
        if os.getpid() == main_pid:
            load.kill_children()
            topo.close()
            shutil.rmtree(tmp, ignore_errors=True)
    atexit.register(cleanup)
    probe_out = tmp / "probe.json"
    sides.nftdivert_argv = lambda: [sys.executable, str(Path(__file__).resolve()), "--probe",
                                    "split" if args.split else "total", str(probe_out)]
    topology.remove_stale()
    topo.up()
    rounds = []
    for rnd in range(args.rounds):
        order = [("queue", _queue_side(sides, topo, tmp, rnd)), ("kernel", sides.KernelSide(topo))]
        got = {}
        for name, side in (order if rnd % 2 == 0 else order[::-1]):
            say(f"round {rnd + 1}: {name}")
            got[name] = phase(side, topo, args, rng, probe_out if name == "queue" else None)
        got["ratio"] = got["queue"]["conn_per_s"] / got["kernel"]["conn_per_s"]
        rounds.append(got)
        _print_round(rnd, got)
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))
    return 0


def _print_round(rnd: int, got: dict) -> None:
    q, k = got["queue"], got["kernel"]
    ours = {name: r["clients_cpu_us_per_conn"] + sum(r["processes_cpu_us_per_conn"].values())
            for name, r in (("kernel", k), ("queue", q))}
    got["cpu_ratio"] = ours["kernel"] / ours["queue"]
    print(f"round {rnd + 1}: conn/s queue {q['conn_per_s']:.0f}, kernel {k['conn_per_s']:.0f}, "
          f"ratio {got['ratio']:.3f}; CPU us/conn of the bench's own processes: queue {ours['queue']:.0f}, "
          f"kernel {ours['kernel']:.0f}, ratio {got['cpu_ratio']:.3f}")
    for name, r in (("kernel", k), ("queue", q)):
        m = r["machine_cpu_us_per_conn"]
        busy = m["user"] + m["system"] + m["softirq"]
        print(f"  {name:6} machine CPU us/conn: busy {busy:.0f} (user {m['user']:.0f}, system {m['system']:.0f}, "
              f"softirq {m['softirq']:.0f}), idle {m['idle']:.0f}")
        print(f"           {r['clients_cpu_us_per_conn']:6.0f}  the clients")
        for proc, us in r["processes_cpu_us_per_conn"].items():
            print(f"           {us:6.0f}  {proc}")
    w = q["worker"]
    print(f"  worker process CPU us/conn {q['worker_cpu_us_per_conn']:.0f}; {w['packets']} packets, "
          f"{w['packets'] / max(1, q['connections']):.1f}/conn; worker thread CPU us/packet "
          f"{w['thread_cpu_us_per_packet']:.2f}, of which the once-a-second tick {w['tick_cpu_us_per_packet']:.2f}")
    print("  worker process threads CPU us/conn: "
          + ", ".join(f"{k} {v:.0f}" for k, v in q["worker_threads_cpu_us_per_conn"].items()))
    if "us_per_packet" in w:
        print(f"  {w['packets_per_drain']:.2f} packets/drain, {w['empty_recv_per_packet']:.2f} empty recv/packet; "
              "worker thread CPU us/packet: " + ", ".join(f"{k} {v:.2f}" for k, v in w["us_per_packet"].items()))


if __name__ == "__main__":
    sys.exit(main())
