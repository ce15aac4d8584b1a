#!/usr/bin/env python3
"""nftdivert benchmark: diverted vs. kernel-only, observed vs. quiet, side by side, in one run.

Builds two network namespaces, a client and a diverter (topology.py), and
measures, alternating the two sides round by round (ABBA), with the SAME
echo listener code (nftdivert.services.listeners.Listeners) on TCP 1337:

  nftdivert        `nftdivert run` (queue backend auto), conversation log as JSON and pcap (-w)
  nftdivert-quiet  the same with neither (what observing costs is the difference)
  kernel-only      one nat rule `redirect to :1337`, no queue, no worker
                   (all three: sides.py; each round in turn, reversed every other round)

  conn/s  a few client processes: connect to a random 198.51.100.x:port,
          send 16 bytes, read the 16-byte echo, compare, close; repeat
  MB/s    one connection: a sender thread streams for --seconds, the
          receiver reads the echo concurrently and compares every byte;
          MB/s = bytes echoed back / (connect .. echo EOF), MB = 1e6 bytes
          (both: load.py)
  µs/pkt  FixUp.incoming / FixUp.outgoing in-process, no kernel, no queue
          (micro.py)

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

import load
import report
import topology
from common import T0, BenchError, say
from micro import micro
from sides import KernelSide, NftdivertSide

from nftdivert.errors import NftDivertError

MAIN_PID = os.getpid()
OBSERVE = {"both": ("log", "pcap"), "log": ("log",), "pcap": ("pcap",)}


def run_side(side, args, rng: random.Random, results: dict, rnd: int) -> None:
    say(f"round {rnd + 1}: {side.name}: starting")
    side.topo.flush_conntrack()
    side.start()
    if isinstance(side, NftdivertSide):
        results["backend"], results["backend_reason"] = side.backend, side.reason
    before = side.counters()
    say(f"round {rnd + 1}: {side.name}: connections for {args.seconds:g}s ({args.workers} workers)")
    conns = load.measure_conns(side.topo, args, rng)
    after = side.counters(after_wall=time.time())
    if before and after:  # traffic ran for --seconds (its warm-up included)
        conns["queued_packets"] = after["seen"] - before["seen"]
        conns["queued_pkt_per_s"] = conns["queued_packets"] / args.seconds
        conns["queued_packets_per_conn"] = conns["queued_packets"] / max(1, conns["connections"])
    say(f"round {rnd + 1}: {side.name}: {conns['conn_per_s']:.0f} conn/s, p50 {conns['lat_p50_ms']:.2f} ms")
    side.topo.flush_conntrack()
    say(f"round {rnd + 1}: {side.name}: bulk echo for {args.seconds:g}s")
    before = after
    bulk = load.measure_bulk(side.topo, args, rng)
    after = side.counters(after_wall=time.time())
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


def cleanup(topo: topology.Topology) -> None:
    if os.getpid() != MAIN_PID:  # a forked worker's exit: not its to clean
        return
    load.kill_children()
    topo.close()


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
    ap.add_argument("--observe", choices=sorted(OBSERVE), default="both",
                    help="what the observed nftdivert side turns on: the conversation log, the pcap (-w), or both "
                         "(default); the quiet side has neither")
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

    topo = topology.Topology(args.workers if args.address_per_worker else 1)
    atexit.register(cleanup, topo)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _interrupt)
    res: dict = {"machine": report.machine(),
                 "settings": {"seconds": args.seconds, "rounds": args.rounds, "workers": args.workers,
                              "address_per_worker": args.address_per_worker,
                              "micro_iterations": args.micro_iterations, "micro_reps": args.micro_reps,
                              "observe": args.observe,
                              "seed": seed},
                 "rounds": [], "ok": False}
    status = 1
    tmp = Path(tempfile.mkdtemp(prefix=f"ndb-{MAIN_PID}-"))
    try:
        say(f"machine: {res['machine']['cores']} cores, Linux {res['machine']['kernel']}; seed {seed}")
        res["micro"] = micro(args.micro_iterations, args.micro_reps)
        topology.remove_stale()
        topo.up()
        for rnd in range(args.rounds):
            sides = [NftdivertSide(topo, tmp, rnd, OBSERVE[args.observe]), NftdivertSide(topo, tmp, rnd, ()),
                     KernelSide(topo)]
            for side in (sides if rnd % 2 == 0 else sides[::-1]):
                run_side(side, args, rng, res, rnd)
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
        cleanup(topo)
        shutil.rmtree(tmp, ignore_errors=True)
    res["duration_s"] = time.monotonic() - T0
    rows = report.summarize(res) if res["ok"] else {}
    if not report.write_json(res, rows, args.json):
        status = status or 1
    if res["ok"]:
        report.print_report(res, rows, args)
    return status


if __name__ == "__main__":
    sys.exit(main())
