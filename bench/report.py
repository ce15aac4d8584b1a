"""The report: the summary over rounds, the table on stdout, every number as JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path


def machine() -> dict:
    u = os.uname()
    return {"cores": os.cpu_count(), "kernel": u.release, "arch": u.machine,
            "python": platform.python_version(), "hostname": u.nodename}


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


METRICS = (("conn_per_s", ("conn", "conn_per_s"), "{:,.0f}"),
           ("conn_latency_p50_ms", ("conn", "lat_p50_ms"), "{:.2f}"),
           ("conn_latency_p99_ms", ("conn", "lat_p99_ms"), "{:.2f}"),
           ("bulk_echo_mb_per_s", ("bulk", "mb_per_s"), "{:,.1f}"))
# What observing may cost: diverted connections/s with log and pcap on, at least this share of both off.
OBSERVATION_GOAL = 0.90


def _compare(res: dict, a_side: str, b_side: str) -> dict:
    rows = {}
    for key, path, fmt in METRICS:
        vals = {side: [r[path[0]][path[1]] for r in res["rounds"] if r["side"] == side] for side in (a_side, b_side)}
        a, b = mean(vals[a_side]), mean(vals[b_side])
        rows[key] = {a_side: a, b_side: b, "ratio": a / b if a and b else None, "per_round": vals, "fmt": fmt}
    return rows


def summarize(res: dict) -> dict:
    """nftdivert (observed) vs. the kernel alone, and `observation`: observed vs. quiet."""
    rows = _compare(res, "nftdivert", "kernel")
    rows["observation"] = _compare(res, "nftdivert", "nftdivert-quiet")
    captures = [r["capture"] for r in res["rounds"] if "capture" in r]
    cap = {k: sum(c[k] for c in captures) for k in ("packets", "overruns", "bytes", "cpu_seconds")}
    cap["cpu_us_per_packet"] = 1e6 * cap["cpu_seconds"] / cap["packets"] if cap["packets"] else None
    rows["observation"]["capture"] = cap
    ratio = rows["observation"]["conn_per_s"]["ratio"]
    rows["observation"]["within_goal"] = ratio is not None and ratio >= OBSERVATION_GOAL
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
        if key == "observation":
            continue
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
    _print_observation(rows["observation"], labels, w, res["settings"]["observe"])
    print(f"\n{'worker cost in-process (us/packet; 1e6/us = packets/s)':<{w}} {'us/pkt':>12} {'pkt/s':>12}")
    print("-" * (w + 34))
    for kind, r in res["micro"].items():
        print(f"{MICRO_LABELS[kind]:<{w}} {r['us_per_packet']:>12.2f} {r['packets_per_s']:>12,.0f}")
    print(f"\nresults: {args.json}; run time {res['duration_s']:.1f}s")


def _print_observation(obs: dict, labels: dict, w: int, observe: str) -> None:
    what = {"both": "conversation log and pcap", "log": "conversation log", "pcap": "pcap"}[observe]
    print(f"\nobservation: {what} on (nftdivert) vs. off (nftdivert-quiet)")
    print(f"{'metric':<{w}} {'observed':>12} {'quiet':>12} {'ratio':>7}")
    print("-" * (w + 34))
    for key, _, _ in METRICS:
        row = obs[key]
        f = row["fmt"]
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        print(f"{labels[key]:<{w}} {f.format(row['nftdivert']):>12} {f.format(row['nftdivert-quiet']):>12} {ratio:>7}")
    cap = obs["capture"]
    if cap["packets"]:
        print(f"{'captured packets (socket overruns: packets lost)':<{w}} {cap['packets']:>12,} {'-':>12} "
              f"{cap['overruns']:>7,}")
    if cap["cpu_us_per_packet"] is not None:
        print(f"{'capture reader CPU (us/packet)':<{w}} {cap['cpu_us_per_packet']:>12.2f} {'-':>12} {'-':>7}")
    verdict = "within" if obs["within_goal"] else "NOT within"
    print(f"connections/s observed: {verdict} {100 - 100 * OBSERVATION_GOAL:.0f}% of quiet")


def write_json(res: dict, rows: dict, path: str) -> bool:
    """All numbers to `path`: machine, settings, every round, the summary with ratios."""
    def plain(v):
        return {kk: plain(vv) for kk, vv in v.items() if kk != "fmt"} if isinstance(v, dict) else v

    res["results"] = plain(rows)
    try:
        Path(path).write_text(json.dumps(res, indent=2) + "\n")
    except OSError as exc:
        print(f"divert_bench: cannot write {path}: {exc}", file=sys.stderr)
        return False
    return True
