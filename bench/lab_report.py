"""The lab row's tables on stdout (its numbers are in the JSON's `lab`)."""

from __future__ import annotations

from lab_load import KINDS


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_lab(lab: dict) -> None:
    rows = lab["rows"]
    print(f"\nlab: {lab['clients']} clients on one bridge, all at once for {lab['seconds']:g}s, each looping "
          "DNS, HTTP, HTTPS, TCP echo, UDP, ping; log and pcap on")
    print(f"{'path':<8} {'conversations':>13} {'per s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  log check")
    print("-" * 80)
    for path, r in rows.items():
        log = r["log"]
        verdict = "ok" if log["ok"] else "NOT ok"
        print(f"{path:<8} {r['exchanges']:>13,} {r['per_s']:>7,.0f} {_ms(r['all']['p50_ms']):>7} "
              f"{_ms(r['all']['p99_ms']):>7} {sum(r['errors'].values()):>6}  {verdict}: {log['starts']:,} starts, "
              f"{log['ends']:,} ends; {log['ends_without_start']} ends without a start, "
              f"{log['starts_without_one_end']} starts without one end")
    print(f"\n{'p50 / p99 ms':<8} " + " ".join(f"{k:>13}" for k in KINDS))
    for path, r in rows.items():
        print(f"{path:<8} " + " ".join(f"{_ms(r['by_kind'][k]['p50_ms']) + ' / ' + _ms(r['by_kind'][k]['p99_ms']):>13}"
                                       for k in KINDS))
    cores = sorted({c for r in rows.values() for g in r["cpu_seconds_per_core"].values() for c in g})
    print(f"\n{'path':<8} {'process':<12} {'CPU s':>7} {'x 1 core':>8} "
          + " ".join(f"{'cpu' + str(c):>7}" for c in cores) + "  RSS MB start -> end")
    print("-" * 80)
    for path, r in rows.items():
        for g, s in r["cpu_seconds"].items():
            per = r["cpu_seconds_per_core"][g]
            rss = r["listeners_rss_mb"].get(g)
            print(f"{path:<8} {g:<12} {s:>7.1f} {r['cpu_share_of_one_core'][g]:>8.2f} "
                  + " ".join(f"{per.get(c, 0.0):>7.1f}" for c in cores)
                  + (f"  {rss[0]:.0f} -> {rss[1]:.0f}" if rss else ""))
        if len(r["listeners"]) > 1:
            per = r["listeners_cpu_per_core"]
            share = r["listeners_cpu_seconds"] / r["wall_s"]
            print(f"{path:<8} {'listeners':<12} {r['listeners_cpu_seconds']:>7.1f} {share:>8.2f} "
                  + " ".join(f"{per.get(c, 0.0):>7.1f}" for c in cores))
    for path, r in rows.items():
        busy = ", ".join(f"cpu{c} {100 * b:.0f}%" for c, b in r["machine_busy_per_core"].items())
        print(f"{path:<8} the {r['clients']} clients' own processes: {r['clients_cpu_seconds']:.1f} CPU s; "
              f"the machine's cores busy: {busy}")
    print("run: `nftdivert run`'s own process (one queue worker, or the tick beside several); worker N: a queue "
          "worker's process;\nx 1 core: CPU s / the load's wall time; cpuN: the seconds spent on core N "
          "(sampled every 0.1 s)")
    gain = workers_gain(rows)
    if gain:
        print(f"\nqueue path, {gain['workers']} queue workers (one per core) vs one, on the same run: "
              f"conversations/s x{gain['per_s']:.2f}, p50 x{gain['p50_ms']:.2f}, p99 x{gain['p99_ms']:.2f}")


def workers_gain(rows: dict) -> dict | None:
    """What the queue row (one worker per core) has over the one-worker row: ratios, and how many workers."""
    many, one = rows.get("queue"), rows.get("queue-1w")
    if not many or not one or not one["per_s"] or not one["all"]["p50_ms"] or not one["all"]["p99_ms"]:
        return None
    workers = sum(1 for g in many["cpu_seconds"] if g.startswith("worker ")) or 1
    return {"workers": workers, "per_s": many["per_s"] / one["per_s"],
            "p50_ms": many["all"]["p50_ms"] / one["all"]["p50_ms"], "p99_ms": many["all"]["p99_ms"] / one["all"]["p99_ms"]}
