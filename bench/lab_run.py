"""The lab row: many clients on one bridge, all at once, on each divert path,
with the conversation log and the pcap on.

For each path: `nftdivert run` on the gateway (the default listeners and a
DNS listener on UDP 53, log and pcap on), the clients' load (lab_load.py)
for --lab-seconds, the CPU time of every process of the run and where it
was spent (lab_cpu.py), the listeners' memory before and after, and the
log checked against what the clients did:

  - every start has its own id, and exactly one end with that id
  - no end without its start (an end of another run)
  - the starts are exactly the clients' conversations: protocol, client
    address and port, destination, and for HTTP and HTTPS the DNS name
    they asked for (the record's `name`)
  - every DNS question has its `dns` record

A path whose clients saw an error or whose log fails a check fails the
benchmark (after its row is reported).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import cpu
import lab_cpu
import lab_load
from common import BenchError, say
from lab_topology import LabTopology
from sides import NftdivertSide, nftdivert_argv

# The default listeners and a DNS listener (giving any listener replaces the defaults).
LISTENERS = (("tcp-echo", "tcp", 1337, "echo"), ("udp-echo", "udp", 1337, "echo"), ("dns", "udp", 53, "dns"))
LISTENER_PORTS = {port for _, _, port, _ in LISTENERS}


def config(state_dir: Path) -> str:
    listeners = "".join(f'[[listeners]]\nname = "{name}"\nprotocol = "{proto}"\nport = {port}\nkind = "{kind}"\n'
                        for name, proto, port, kind in LISTENERS)
    return f'{listeners}[tls]\nstate_dir = "{state_dir}"\n[http]\nbodies_dir = ""\n'  # no request body saved


def make_ca(tmp: Path) -> tuple[Path, str]:
    """nftdivert's CA in a state directory of the run's own; (that directory, the CA's PEM file)."""
    state = tmp / "tls"
    cfg = tmp / "ca.toml"
    cfg.write_text(f'[tls]\nstate_dir = "{state}"\n')
    proc = subprocess.run([*nftdivert_argv(), "ca", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not (state / "ca.pem").exists():
        raise BenchError(f"nftdivert ca exited {proc.returncode}: {proc.stderr.strip()}")
    return state, str(state / "ca.pem")


def _key(rec: dict) -> tuple:
    detail = f"id {rec['icmp']['id']}" if rec.get("protocol") == "icmp" else rec.get("name") or ""
    return rec.get("protocol"), rec.get("client"), rec.get("original_destination"), detail


def _brief(rec: dict) -> str:
    """A start or end in one line: enough to tell a reused client port from a lost record."""
    keys = ("time", "event", "id", "original_destination", "listener", "ended", "duration", "sent", "received")
    return " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k) is not None)


def check_log(path: Path, made: list[list], dns: list[list]) -> dict:
    """The log against the clients' conversations and questions; `ok` and what was wrong.

    A start pairs with its end by `id`, `client` and `original_destination`, as
    the schema says: the id is conntrack's 32-bit hash, and among this row's
    tens of thousands of conversations two share one about every other run.
    """
    starts: dict[tuple, dict] = {}
    dup_starts = 0
    ends: Counter = Counter()
    by_client: dict[str, list[dict]] = {}  # every start and end of a client port: what a failure shows
    asked: Counter = Counter()
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        event = rec.get("event")
        if event in ("start", "end") and rec.get("client"):
            by_client.setdefault(rec["client"], []).append(rec)
        pair = (rec.get("id"), rec.get("client"), rec.get("original_destination"))
        if event == "start":
            dup_starts += pair in starts
            starts[pair] = rec
        elif event == "end":
            ends[pair] += 1
        elif event == "dns":
            asked[(rec.get("client"), rec.get("name"))] += 1
    logged = Counter(_key(r) for r in starts.values())
    expected = Counter(tuple(c) for c in made)
    missing, unexpected = expected - logged, logged - expected
    dns_missing = Counter(tuple(q) for q in dns) - asked
    out = {"starts": len(starts), "ends": sum(ends.values()), "duplicate_starts": dup_starts,
           "ends_without_start": sum(n for i, n in ends.items() if i not in starts),
           "starts_without_one_end": sum(1 for i in starts if ends[i] != 1),
           "without_one_end_by_protocol": Counter(r["protocol"] for i, r in starts.items() if ends[i] != 1),
           "conversations_missing": sum(missing.values()), "conversations_unexpected": sum(unexpected.values()),
           "dns_questions": len(dns), "dns_records_missing": sum(dns_missing.values()),
           "examples": [str(k) for k in [*list(missing)[:2], *list(unexpected)[:2], *list(dns_missing)[:2]]]}
    odd = [*list(missing)[:2], *list(unexpected)[:2]]
    odd += [(r["protocol"], r["client"]) for i, r in starts.items() if ends[i] != 1][:2]
    out["forensics"] = {k[1]: [_brief(r) for r in by_client.get(k[1], [])][-8:] for k in odd}
    out["ok"] = not any(out[k] for k in ("duplicate_starts", "ends_without_start", "starts_without_one_end",
                                         "conversations_missing", "conversations_unexpected",
                                         "dns_records_missing"))
    return out


# The queue path again with one queue worker: what one worker per core gains, on the same run.
ONE_WORKER = "queue-1w"


def run_path(topo: LabTopology, tmp: Path, path: str, seconds: float, rng, tls: tuple[Path, str],
             unique_ports: bool) -> dict:
    state_dir, ca_file = tls
    workers = "workers = 1\n" if path == ONE_WORKER else ""  # into [queue], which the side's config ends with
    divert_path = "queue" if path == ONE_WORKER else path
    side = NftdivertSide(topo, tmp, 0, divert_path, ("log", "pcap"), workers + config(state_dir),
                         name=f"lab {path} path")
    topo.flush_conntrack()
    say(f"lab: {path} path: starting nftdivert run (log and pcap on)")
    side.start()
    groups = lab_cpu.classify(side.proc.pid, LISTENER_PORTS, _workers(side.err.read_text(errors="replace")))
    listeners = [g for g in groups if g.startswith("listener")]
    rss_start = {g: lab_cpu.rss_mb(groups[g]) for g in listeners}
    before = {g: sum(cpu.cpu_seconds(p) for p in pids) for g, pids in groups.items()}
    sampler = lab_cpu.CoreSampler(groups)
    say(f"lab: {path} path: {topo.n} clients at once for {seconds:g}s; processes: "
        + ", ".join(f"{g} {pids[0]}" for g, pids in groups.items()))
    sampler.start()
    machine = lab_cpu.machine_busy()
    kernel_before = kernel_counters(topo.divert)
    t0 = time.monotonic()
    try:
        load = lab_load.run(topo, ca_file, seconds, rng, unique_ports)
    finally:
        per_core = sampler.stop()
        machine = lab_cpu.busy_share(machine, lab_cpu.machine_busy())
    wall = time.monotonic() - t0
    cpu_s = {g: round(sum(cpu.cpu_seconds(p) for p in pids) - before[g], 2) for g, pids in groups.items()}
    rss_end = {g: lab_cpu.rss_mb(groups[g]) for g in listeners}
    kernel = {k: v - kernel_before.get(k, 0) for k, v in kernel_counters(topo.divert).items()}
    info = side.stop()
    log = check_log(side.log, load.pop("made"), load.pop("dns"))
    row = {**load, "wall_s": wall, "cpu_seconds": cpu_s,
           "cpu_share_of_one_core": {g: round(s / wall, 3) for g, s in cpu_s.items()},
           "cpu_seconds_per_core": per_core, "machine_busy_per_core": machine, "listeners": listeners,
           "listeners_cpu_seconds": round(sum(cpu_s[g] for g in listeners), 2),
           "listeners_cpu_per_core": _sum_cores(per_core, listeners),
           "listeners_rss_mb": {g: [round(rss_start[g], 1), round(rss_end[g], 1)] for g in listeners},
           "log": log, "kernel_counters": kernel, "capture": info.get("capture"), "worker_final": info.get("final"),
           "run_stderr_tail": side.err.read_text(errors="replace")[-3000:]}
    say(f"lab: {path} path: {row['per_s']:.0f} conversations/s, p50 {row['all']['p50_ms']:.1f} ms, "
        f"p99 {row['all']['p99_ms']:.1f} ms, errors {sum(row['errors'].values())}, "
        f"log {'ok' if log['ok'] else 'NOT ok'}")
    return row


def _workers(stderr: str) -> list[int]:
    """The queue workers' pids, in order, as the run names them (none for one worker)."""
    found = re.search(r"(\d+) queue workers \(pids ([\d, ]+)\)", stderr)
    return [int(p) for p in found[2].split(",")] if found else []


# The gateway's own counters that explain a conversation seen twice or lost:
# conntrack's (summed over CPUs) and TCP's (a SYN that met a socket in TIME_WAIT).
CT_STATS = ("insert_failed", "drop", "early_drop", "error", "clash_resolve", "search_restart", "chaintoolong")
TCP_STATS = ("PAWSEstab", "PAWSTimewait", "TCPACKSkippedTimeWait", "TW", "TWKilled", "TCPTimeWaitOverflow",
             "ListenOverflows", "ListenDrops", "TCPAbortOnData", "TCPAbortOnClose")


def kernel_counters(ns) -> dict[str, int]:
    """CT_STATS and TCP_STATS of the namespace `ns` now (deltas make sense, not values)."""
    out: dict[str, int] = {}
    for line in ns.run("conntrack", "-S", check=False).stdout.splitlines():
        for key, value in re.findall(r"(\w+)=(\d+)", line):
            if key in CT_STATS:
                out[f"ct_{key}"] = out.get(f"ct_{key}", 0) + int(value)
    lines = ns.run("cat", "/proc/net/netstat", check=False).stdout.splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            for key, value in zip(names.split()[1:], values.split()[1:]):
                if key in TCP_STATS:
                    out[f"tcp_{key}"] = int(value)
    return out


def _sum_cores(per_core: dict[str, dict[int, float]], labels: list[str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for g in labels:
        for core, s in per_core[g].items():
            out[core] = round(out.get(core, 0.0) + s, 2)
    return dict(sorted(out.items()))


def failures(rows: dict) -> list[str]:
    """What makes the lab row fail: client errors, a log check that did not hold."""
    out = []
    for path, row in rows.items():
        if sum(row["errors"].values()):
            out.append(f"{path} path: client errors {row['errors']} (first: {row['first_error']})")
        if not row["log"]["ok"]:
            out.append(f"{path} path: the conversation log: {row['log']}; "
                       f"the gateway's counters: {row.get('kernel_counters')}")
    return out


def run(paths, lab: dict, tmp: Path, rng, topos: list) -> None:
    """The lab on each path in turn, each in a lab of its own (registered in `topos` for the cleanup);
    each path's row into lab["rows"] as it is done. `lab`: clients, seconds, unique_ports.
    With the queue path, its row again with one queue worker (ONE_WORKER): what the default
    (one per core) gains over one, measured side by side.

    Not one lab for both: the listener sockets of the first run that closed
    first wait in TIME_WAIT for 60 s, and the queue path's worker knows only
    its own. A conversation of the next run from the same client port then
    lands on one, the stale ACK makes the client reset and retry, and the log
    has two starts for it (measured: a few in a thousand).
    """
    tls = make_ca(tmp)
    for path in [*paths, *([ONE_WORKER] if "queue" in paths and lab.get("one_worker", True) else [])]:
        topo = LabTopology(lab["clients"])
        topos.append(topo)
        topo.up()
        lab["rows"][path] = run_path(topo, tmp, path, lab["seconds"], rng, tls, lab["unique_ports"])
        topo.close()
