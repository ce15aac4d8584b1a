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
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": model, "kernel": u.release, "arch": u.machine,
            "python": platform.python_version(), "hostname": u.nodename,
            "load_average_at_start": os.getloadavg()[0]}


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
METRIC_LABELS = {"conn_per_s": "connections/s", "conn_latency_p50_ms": "latency p50 ms",
                 "conn_latency_p99_ms": "latency p99 ms", "bulk_echo_mb_per_s": "bulk MB/s"}
CPU_GROUPS = ("worker", "listener", "others")
REFERENCE = "kernel"
ROW_ORDER = (REFERENCE, "kernel path", "queue path")  # then an observed row
# Issue 13's goals. The kernel path: at least this share of the kernel alone, connections/s and bulk.
KERNEL_PATH_GOAL = 0.90
# The queue path: its connections/s ratio at least this many times what it was before that work.
QUEUE_PATH_GAIN = 1.5
# Measured with this benchmark before that work (two runs of 4 rounds on 2 cores, main at 0770720:
# 0.305 and 0.293; one round to the next from 0.24 to 0.42 on that busy machine).
QUEUE_PATH_BEFORE = 0.30
# What observing may cost: connections/s with log and pcap on, at least this share of the same path quiet.
OBSERVATION_GOAL = 0.90


def _means(res: dict, side: str) -> dict:
    rounds = [r for r in res["rounds"] if r["side"] == side]
    row: dict = {"rounds": len(rounds), "per_round": {}}
    for key, (phase, name), _ in METRICS:
        vals = [r[phase][name] for r in rounds]
        row[key], row["per_round"][key] = mean(vals), vals
    for phase, name in (("conn", "cpu_s_per_1k_conn"), ("bulk", "cpu_s_per_gb")):
        groups = [g for g in CPU_GROUPS if all(g in r[phase][name] for r in rounds)]
        row[name] = {g: mean([r[phase][name][g] for r in rounds]) for g in groups}
    return row


def _row_order(name: str) -> int:
    return ROW_ORDER.index(name) if name in ROW_ORDER else len(ROW_ORDER)


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(res: dict) -> dict:
    """Each side's means over rounds, ratios to the kernel side, the speed goals as measured, observation."""
    names = sorted(dict.fromkeys(r["side"] for r in res["rounds"]), key=_row_order)
    sides = {name: _means(res, name) for name in names}
    ref = sides[REFERENCE]
    for row in sides.values():
        row["ratio"] = {key: _ratio(row[key], ref[key]) for key, _, _ in METRICS}
    out: dict = {"sides": sides, "goals": _goals(sides, res["settings"]["queue_path_before"])}
    observed = next((n for n in names if n.endswith(" observed")), None)
    if observed:
        out["observation"] = _observation(res, sides, observed)
    return out


def _goals(sides: dict, before: float | None) -> dict:
    goals = {}
    kp = sides.get("kernel path")
    if kp:
        for key in ("conn_per_s", "bulk_echo_mb_per_s"):
            r = kp["ratio"][key]
            goals[f"kernel_path_{key}"] = {"ratio": r, "goal": KERNEL_PATH_GOAL,
                                           "met": r is not None and r >= KERNEL_PATH_GOAL}
    qp = sides.get("queue path")
    if qp:
        r = qp["ratio"]["conn_per_s"]
        goal = QUEUE_PATH_GAIN * before if before else None
        goals["queue_path_conn_per_s"] = {"ratio": r, "before": before, "goal": goal,
                                          "met": None if goal is None else r is not None and r >= goal}
    return goals


def _observation(res: dict, sides: dict, observed: str) -> dict:
    quiet = observed.removesuffix(" observed")
    obs = {"observed": observed, "quiet": quiet,
           "ratio": {key: _ratio(sides[observed][key], sides[quiet][key]) for key, _, _ in METRICS}}
    captures = [r["capture"] for r in res["rounds"] if "capture" in r]
    cap = {k: sum(c[k] for c in captures) for k in ("packets", "overruns", "bytes", "cpu_seconds")}
    cap["cpu_us_per_packet"] = 1e6 * cap["cpu_seconds"] / cap["packets"] if cap["packets"] else None
    obs["capture"] = cap
    ratio = obs["ratio"]["conn_per_s"]
    obs["within_goal"] = ratio is not None and ratio >= OBSERVATION_GOAL
    return obs


def _fmt(fmt: str, v) -> str:
    return "-" if v is None else fmt.format(v)


def print_report(res: dict, rows: dict, args) -> None:
    m, st = res["machine"], res["settings"]
    print(f"\nnftdivert benchmark: {m['cores']} cores ({m['cpu_model'] or '?'}), Linux {m['kernel']} {m['arch']}, "
          f"Python {m['python']}; load average at start {m['load_average_at_start']:.2f}")
    print(f"queue backend: {res.get('backend', '?')} ({res.get('backend_reason', '')})")
    rounds = f"{st['rounds']} round{'s' if st['rounds'] != 1 else ''}"
    print(f"{rounds} (ABBA order), {st['seconds']:g}s per phase, mean of rounds; "
          f"{st['workers']} clients connecting at once, {st['bulk_streams']} bulk streams at once\n")
    sides = rows["sides"]
    w = 22
    print(f"{'':<{w + 56}} {'CPU s per 1,000 conn':>20}")
    print(f"{'row':<{w}} {'conn/s':>9} {'x kernel':>8} {'p50 ms':>7} {'p99 ms':>7} {'bulk MB/s':>10} {'x kernel':>8} "
          f"{'worker':>9} {'listener':>10}")
    print("-" * (w + 76))
    for name, row in sides.items():
        r, cpu = row["ratio"], row["cpu_s_per_1k_conn"]
        print(f"{name:<{w}} {_fmt('{:,.0f}', row['conn_per_s']):>9} {_fmt('{:.3f}', r['conn_per_s']):>8} "
              f"{_fmt('{:.2f}', row['conn_latency_p50_ms']):>7} {_fmt('{:.2f}', row['conn_latency_p99_ms']):>7} "
              f"{_fmt('{:,.1f}', row['bulk_echo_mb_per_s']):>10} {_fmt('{:.3f}', r['bulk_echo_mb_per_s']):>8} "
              f"{_fmt('{:.3f}', cpu.get('worker')):>9} {_fmt('{:.3f}', cpu.get('listener')):>10}")
    print(f"\nCPU seconds per 1,000 connections (connections phase) and per GB echoed (bulk phase)")
    print(f"{'row':<{w}} " + " ".join(f"{g + ' /1k':>12}" for g in CPU_GROUPS) + "  "
          + " ".join(f"{g + ' /GB':>12}" for g in CPU_GROUPS))
    print("-" * (w + 81))
    for name, row in sides.items():
        conn, bulk = row["cpu_s_per_1k_conn"], row["cpu_s_per_gb"]
        print(f"{name:<{w}} " + " ".join(f"{_fmt('{:.3f}', conn.get(g)):>12}" for g in CPU_GROUPS) + "  "
              + " ".join(f"{_fmt('{:.2f}', bulk.get(g)):>12}" for g in CPU_GROUPS))
    print("worker: `nftdivert run`'s own process (the queue worker and its threads); listener: its listener "
          "process,\nor the kernel row's echo server; others: its other children (observer, capture reader)")
    _print_goals(rows["goals"])
    _print_queued(res)
    if "observation" in rows:
        _print_observation(rows["observation"], sides, w, res["settings"]["observe"])
    w = 50
    print(f"\n{'worker cost in-process (us/packet; 1e6/us = packets/s)':<{w}} {'us/pkt':>12} {'pkt/s':>12}")
    print("-" * (w + 26))
    for kind, r in res["micro"].items():
        print(f"{MICRO_LABELS[kind]:<{w}} {r['us_per_packet']:>12.2f} {r['packets_per_s']:>12,.0f}")
    print(f"\nresults: {args.json}; run time {res['duration_s']:.1f}s")


def _print_goals(goals: dict) -> None:
    if not goals:
        return
    print("\nthe speed goals (the kernel path at least 0.90x the kernel; the queue path 1.5x its earlier ratio), "
          "as measured in this run:")
    labels = {"kernel_path_conn_per_s": "kernel path connections/s", "kernel_path_bulk_echo_mb_per_s":
              "kernel path bulk MB/s"}
    for key, g in goals.items():
        ratio = _fmt("{:.3f}", g["ratio"])
        if key in labels:
            verdict = "met" if g["met"] else "NOT met"
            print(f"  {labels[key]:<28} {ratio}x kernel; goal at least {g['goal']:.2f}x: {verdict}")
        elif g["goal"] is None:
            print(f"  {'queue path connections/s':<28} {ratio}x kernel; goal at least {QUEUE_PATH_GAIN:g}x its ratio "
                  "before the queue work (not given: --queue-before)")
        else:
            verdict = "met" if g["met"] else "NOT met"
            print(f"  {'queue path connections/s':<28} {ratio}x kernel; goal at least {QUEUE_PATH_GAIN:g}x "
                  f"{g['before']:.3f} (before the queue work) = {g['goal']:.3f}x: {verdict}")


def _print_queued(res: dict) -> None:
    """Packets through NFQUEUE, from the worker's stats file, for the rows that have them."""
    names = list(dict.fromkeys(r["side"] for r in res["rounds"] if "queued_pkt_per_s" in r["conn"]))
    if not names:
        return
    w = 22
    print(f"\n{'packets through NFQUEUE':<{w}} {'pkt/s conn':>11} {'pkt/conn':>9} {'pkt/s bulk':>11}")
    print("-" * (w + 33))
    for name in names:
        rounds = [r for r in res["rounds"] if r["side"] == name]
        qc = mean([r["conn"]["queued_pkt_per_s"] for r in rounds if "queued_pkt_per_s" in r["conn"]])
        ppc = mean([r["conn"]["queued_packets_per_conn"] for r in rounds if "queued_packets_per_conn" in r["conn"]])
        qb = mean([r["bulk"]["queued_pkt_per_s"] for r in rounds if "queued_pkt_per_s" in r["bulk"]])
        print(f"{name:<{w}} {_fmt('{:,.0f}', qc):>11} {_fmt('{:.1f}', ppc):>9} {_fmt('{:,.0f}', qb):>11}")


def _print_observation(obs: dict, sides: dict, w: int, observe: str) -> None:
    what = {"both": "conversation log and pcap", "log": "conversation log", "pcap": "pcap"}[observe]
    observed, quiet = obs["observed"], obs["quiet"]
    print(f"\nobservation: {what} on ({observed}) vs. off ({quiet})")
    print(f"{'metric':<{w}} {'observed':>12} {'quiet':>12} {'ratio':>7}")
    print("-" * (w + 34))
    for key, _, fmt in METRICS:
        print(f"{METRIC_LABELS[key]:<{w}} {_fmt(fmt, sides[observed][key]):>12} {_fmt(fmt, sides[quiet][key]):>12} "
              f"{_fmt('{:.3f}', obs['ratio'][key]):>7}")
    cap = obs["capture"]
    if cap["packets"]:
        print(f"{'captured packets, overruns':<{w}} {cap['packets']:>12,} {'-':>12} {cap['overruns']:>7,}")
    if cap["cpu_us_per_packet"] is not None:
        print(f"{'capture reader us/packet':<{w}} {cap['cpu_us_per_packet']:>12.2f} {'-':>12} {'-':>7}")
    verdict = "within" if obs["within_goal"] else "NOT within"
    print(f"connections/s observed: {verdict} {100 - 100 * OBSERVATION_GOAL:.0f}% of quiet")


def write_json(res: dict, rows: dict, path: str) -> bool:
    """All numbers to `path`: machine, settings, every round, the summary with ratios."""
    res["results"] = rows
    try:
        Path(path).write_text(json.dumps(res, indent=2) + "\n")
    except OSError as exc:
        print(f"divert_bench: cannot write {path}: {exc}", file=sys.stderr)
        return False
    return True
