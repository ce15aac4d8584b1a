#!/usr/bin/env python3
"""nftdivert benchmark: its two divert paths vs. the kernel alone, side by side, in one run.

Builds two network namespaces, a client and a diverter (topology.py), and
measures, alternating the sides round by round (ABBA), with the SAME echo
listener code (nftdivert.services.listeners.Listeners) on TCP 1337:

  kernel       one nat rule `redirect to :1337`, no nftdivert: the reference
  kernel path  `nftdivert run`, divert_path = "kernel", quiet (no log, no pcap)
  queue path   `nftdivert run`, divert_path = "queue", quiet
  observed     with --observe: a path with the log, the pcap or both on
               (all: sides.py)

  conn/s  --workers client processes at once, each: connect to a random
          198.51.100.x:port, send 16 bytes, read the 16-byte echo, compare,
          close; repeat
  MB/s    --bulk-streams connections at once: a sender thread streams for
          --seconds, the receiver reads the echo concurrently and compares
          every byte; MB/s = bytes echoed back / (first connect .. last echo
          EOF), MB = 1e6 bytes (both: load.py)
  CPU     utime+stime of nftdivert's own process (the queue worker), of its
          listener process and of its other children, or of the kernel
          side's echo server, around the conn/s phase (cpu.py)
  µs/pkt  FixUp.incoming / FixUp.outgoing in-process, no kernel, no queue
          (micro.py)
  lab     then --lab-clients client namespaces on one bridge (lab_topology.py),
          all at once for --lab-seconds on each path, log and pcap on: DNS,
          HTTP, HTTPS, TCP echo, UDP, ping in a loop (lab_load.py); conv/s,
          p50/p99 per kind, CPU per process and per core, the listeners'
          memory, the log checked against the clients (lab_run.py); with the
          queue path, its row again with one queue worker: what one worker
          per core (the default) gains, side by side

The table and bench-results.json come from report.py.

Run as root:  .venv/bin/python bench/divert_bench.py [--seconds N] [--json FILE]
Exit status: 0 all phases passed, 1 a phase failed, 2 cannot run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import cpu
import lab_run
import lab_topology
import load
import report
import topology
from lab_report import print_lab, workers_gain
from common import T0, BenchError, say
from micro import micro
from sides import KernelSide, NftdivertSide

from nftdivert.errors import NftDivertError

MAIN_PID = os.getpid()
OBSERVE = {"both": ("log", "pcap"), "log": ("log",), "pcap": ("pcap",)}
PATHS = ("kernel", "queue")
BULK_STREAMS = 4


def _paths(text: str) -> tuple[str, ...]:
    paths = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {', '.join(PATHS)}")
    return paths


def run_side(side, args, rng: random.Random, results: dict, rnd: int) -> None:
    say(f"round {rnd + 1}: {side.name}: starting")
    side.topo.flush_conntrack()
    side.start()
    if isinstance(side, NftdivertSide) and side.backend:
        results["backend"], results["backend_reason"] = side.backend, side.reason
    procs = side.processes()
    before = side.counters()
    say(f"round {rnd + 1}: {side.name}: connections for {args.seconds:g}s ({args.workers} clients at once)")
    cpu_before = procs.sample()
    conns = load.measure_conns(side.topo, args, rng)
    conns["cpu_seconds"] = cpu.delta(cpu_before, procs.sample())
    conns["cpu_s_per_1k_conn"] = {k: 1000 * v / conns["connections"] for k, v in conns["cpu_seconds"].items()}
    after = side.counters(after_wall=time.time()) if before else None
    if before and after:  # traffic ran for --seconds (its warm-up included)
        conns["queued_packets"] = after["seen"] - before["seen"]
        conns["queued_pkt_per_s"] = conns["queued_packets"] / args.seconds
        conns["queued_packets_per_conn"] = conns["queued_packets"] / max(1, conns["connections"])
    say(f"round {rnd + 1}: {side.name}: {conns['conn_per_s']:.0f} conn/s, p50 {conns['lat_p50_ms']:.2f} ms; "
        f"CPU s per 1000 connections: " + ", ".join(f"{k} {v:.3f}" for k, v in conns["cpu_s_per_1k_conn"].items()))
    side.topo.flush_conntrack()
    say(f"round {rnd + 1}: {side.name}: bulk echo for {args.seconds:g}s ({args.bulk_streams} streams at once)")
    before = after
    cpu_before = procs.sample()
    bulk = load.measure_bulk(side.topo, args, rng)
    bulk["cpu_seconds"] = cpu.delta(cpu_before, procs.sample())
    bulk["cpu_s_per_gb"] = {k: 1e9 * v / max(1, bulk["bytes"]) for k, v in bulk["cpu_seconds"].items()}
    after = side.counters(after_wall=time.time()) if before else None
    if before and after:
        bulk["queued_packets"] = after["seen"] - before["seen"]
        bulk["queued_pkt_per_s"] = bulk["queued_packets"] / bulk["seconds"]
        bulk["bytes_per_queued_packet"] = 2 * bulk["bytes"] / max(1, bulk["queued_packets"])
    say(f"round {rnd + 1}: {side.name}: {bulk['mb_per_s']:.1f} MB/s echoed")
    info = side.stop()
    if isinstance(side, NftdivertSide) and "log_targets" in info:
        missing = [t for t in conns["sample"] if t not in info["log_targets"]]
        if info["log_tcp_conversations"] == 0:
            raise BenchError("nftdivert logged no diverted TCP conversation")
        if missing:
            say(f"note: {len(missing)} sampled targets not (yet) in the conversation log, e.g. {missing[0]}")
        conns["log_tcp_conversations"] = info["log_tcp_conversations"]
    if isinstance(side, NftdivertSide):
        conns["worker_final"] = info["final"]
    conns.pop("sample")
    results["rounds"].append({"round": rnd + 1, "side": side.name, "conn": conns, "bulk": bulk,
                              **({"capture": info["capture"]} if "capture" in info else {})})


def sides_of_round(topo: topology.Topology, tmp: Path, args, rnd: int) -> list:
    """The sides in this round's order: every other round reversed (ABBA)."""
    sides = [NftdivertSide(topo, tmp, rnd, path) for path in args.paths]
    if args.observe:
        sides.append(NftdivertSide(topo, tmp, rnd, args.observe_path, OBSERVE[args.observe]))
    sides.append(KernelSide(topo))
    return sides if rnd % 2 == 0 else sides[::-1]


def cleanup(topos: list) -> None:
    if os.getpid() != MAIN_PID:  # a forked worker's exit: not its to clean
        return
    load.kill_children()
    for topo in topos:
        topo.close()


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="nftdivert's divert paths vs. the kernel alone, side by side "
                                             "(needs root).")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement phase (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, sides alternating ABBA (default 2)")
    ap.add_argument("--workers", type=int, default=4,
                    help="client processes connecting at once in the connections phase (default 4)")
    ap.add_argument("--bulk-streams", type=int, default=BULK_STREAMS,
                    help=f"bulk connections at once, one client process each (default {BULK_STREAMS})")
    ap.add_argument("--paths", type=_paths, default=PATHS,
                    help="the nftdivert divert paths measured, comma-separated (default kernel,queue)")
    ap.add_argument("--address-per-worker", action="store_true",
                    help="give each worker its own client address (default: all share one, as a real client "
                         "does; concurrent connections then often share a client port, which nftdivert "
                         "must tell apart by their original destination)")
    ap.add_argument("--micro-iterations", type=int, default=30000, help="packets per micro timing (default 30000)")
    ap.add_argument("--micro-reps", type=int, default=5, help="repetitions per micro timing, best kept (default 5)")
    ap.add_argument("--observe", choices=sorted(OBSERVE), default=None,
                    help="add an observed row: --observe-path with the conversation log, the pcap (-w), or "
                         "both on, compared with the same path quiet (default: no observed row)")
    ap.add_argument("--observe-path", choices=PATHS, default="queue",
                    help="the path of the observed row (default queue)")
    ap.add_argument("--queue-before", type=float, default=report.QUEUE_PATH_BEFORE,
                    help="the queue path's connections/s ratio to the kernel before the work on the queue path, "
                         "for the goal of 1.5x it (default %(default)s, measured with this benchmark)")
    ap.add_argument("--lab-clients", type=int, default=50,
                    help="the lab row: this many client namespaces on one bridge, all at once, on each path "
                         "of --paths with log and pcap on (default 50; 0: no lab row)")
    ap.add_argument("--lab-seconds", type=float, default=60.0, help="the lab row's length per path (default 60)")
    ap.add_argument("--lab-only", action="store_true", help="only the lab row (no rounds, no in-process timing)")
    ap.add_argument("--lab-unique-ports", action="store_true",
                    help="each lab client's TCP connections from ports it has not used in the run (default: the "
                         "kernel chooses, as for a real client, and may reuse a port whose listener socket still "
                         "waits in TIME_WAIT: see docs/performance.md)")
    ap.add_argument("--seed", type=int, default=None, help="random seed for targets and payloads")
    ap.add_argument("--json", default="bench-results.json",
                    help="write all numbers here (default: ./bench-results.json)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1 or not 1 <= args.workers <= 200 or args.micro_iterations < 1000 \
            or not 1 <= args.bulk_streams <= 32:
        ap.error("--seconds > 0, --rounds >= 1, --workers 1-200, --bulk-streams 1-32, --micro-iterations >= 1000")
    if not 0 <= args.lab_clients <= lab_topology.MAX_CLIENTS or args.lab_seconds <= 0 \
            or (args.lab_only and not args.lab_clients):
        ap.error(f"--lab-clients 0-{lab_topology.MAX_CLIENTS} (at least 1 with --lab-only), --lab-seconds > 0")
    if args.observe and args.observe_path not in args.paths:
        ap.error(f"--observe-path {args.observe_path}: compared with that path quiet, so --paths must include it")
    if os.geteuid() != 0:
        print("divert_bench: must run as root (it creates network namespaces and nftables tables)", file=sys.stderr)
        return 2
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        print(f"divert_bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    rng = random.Random(seed)

    topo = topology.Topology(args.workers if args.address_per_worker else 1)
    topos: list = [topo]
    atexit.register(cleanup, topos)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    res: dict = {"machine": report.machine(),
                 "settings": {"seconds": args.seconds, "rounds": args.rounds, "workers": args.workers,
                              "bulk_streams": args.bulk_streams, "paths": list(args.paths),
                              "address_per_worker": args.address_per_worker,
                              "micro_iterations": args.micro_iterations, "micro_reps": args.micro_reps,
                              "queue_path_before": args.queue_before,
                              "observe": args.observe, "observe_path": args.observe_path if args.observe else None,
                              "lab_clients": args.lab_clients, "lab_seconds": args.lab_seconds,
                              "lab_only": args.lab_only, "lab_unique_ports": args.lab_unique_ports,
                              "seed": seed},
                 "rounds": [], "ok": False}
    status = 1
    tmp = Path(tempfile.mkdtemp(prefix=f"ndb-{MAIN_PID}-"))
    try:
        m = res["machine"]
        say(f"machine: {m['cores']} cores ({m['cpu_model']}), Linux {m['kernel']}; seed {seed}")
        topology.remove_stale()
        lab_topology.remove_stale()
        if not args.lab_only:
            res["micro"] = micro(args.micro_iterations, args.micro_reps)
            topo.up()
            for rnd in range(args.rounds):
                for side in sides_of_round(topo, tmp, args, rnd):
                    run_side(side, args, rng, res, rnd)
            res["rounds_done"] = True  # their tables are printed even if the lab row fails
            topo.close()
        if args.lab_clients:
            res["lab"] = {"clients": args.lab_clients, "seconds": args.lab_seconds,
                          "unique_ports": args.lab_unique_ports, "rows": {}}
            lab_run.run(args.paths, res["lab"], tmp, rng, topos)
            res["lab"]["workers_gain"] = workers_gain(res["lab"]["rows"])
            failed = lab_run.failures(res["lab"]["rows"])
            if failed:
                raise BenchError("the lab row: " + "; ".join(failed))
        res["ok"] = True
        status = 0
    except (BenchError, NftDivertError) as exc:  # the latter: a command in a namespace failed
        res["error"] = str(exc)
        print(f"divert_bench: FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        res["error"] = f"interrupted ({exc or 'SIGINT'})"
        print("divert_bench: interrupted, cleaning up", file=sys.stderr)
        status = 130
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        cleanup(topos)
        shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = time.monotonic() - T0
    rows = report.summarize(res) if res.get("rounds_done") else {}
    if not report.write_json(res, rows, args.json):
        status = status or 1
    if rows:
        report.print_report(res, rows, args)
    if res.get("lab", {}).get("rows"):
        print_lab(res["lab"])
    return status


if __name__ == "__main__":
    sys.exit(main())
