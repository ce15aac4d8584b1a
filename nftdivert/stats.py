"""The running worker's counters: the file `status` reads (and the sandbox removes
after a killed run), and the one-line summary `run` and `status` print.

One file per table and network namespace, as the ownership lock (ruleset/owner.py),
beside it: test labs run many at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nftdivert import metrics
from nftdivert.config import Config
from nftdivert.ruleset import owner

STATS_DIR = owner.STATE_DIR


def stats_path(table: str) -> Path:
    return STATS_DIR / f"{table}-{owner.netns_id()}.json"


def write(path: Path, snapshot: dict, config: Config) -> None:
    """The counters for `status` (and Prometheus, if configured); a file that fails is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot))
        tmp.replace(path)
        if config.worker.metrics_file:  # the same counters for Prometheus (node_exporter's textfile collector)
            metrics.write(config.worker.metrics_file, snapshot, config.table)
    except OSError:
        pass  # stats are a courtesy; diverting goes on


def read(table: str) -> dict | None:
    """The running worker's counters for `table` in this namespace, if one runs."""
    path = stats_path(table)
    try:
        snap = json.loads(path.read_text())
        os.kill(snap["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return snap


def summary(snap: dict) -> str:
    return (_path_summary(snap) + (f"; spoofed sources: dropped {snap['spoofed']} packets" if "spoofed" in snap else "")
            + _processes_summary(snap) + _syslog_summary(snap.get("syslog"))
            + _tasks_summary(snap))


def _syslog_summary(shipped: dict | None) -> str:
    if not shipped:
        return ""
    return (f"; syslog records sent {shipped['sent']}, buffered {shipped['buffered']}, dropped {shipped['dropped']}"
            f" ({shipped['connections']} connections, {'connected' if shipped['connected'] else 'not connected'})")


def _tasks_summary(snap: dict) -> str:
    running = snap.get("tasks")
    return f"; analyses running: {', '.join(running)}" if running else ""


def _processes_summary(snap: dict) -> str:
    text = ""
    if workers := snap.get("worker_conversations"):
        text += f"; queue workers' conversations {' + '.join(str(n) for _, n in sorted(workers.items(), key=lambda w: int(w[0])))}"
    each = snap.get("listener_processes")
    if not each:
        return text
    return text + (f"; listener processes' conversations {' + '.join(map(str, each))} "
                   f"(DNS pool questions unanswered {snap.get('pool_unanswered', 0)})")


def _path_summary(snap: dict) -> str:
    if snap.get("path") == "kernel":
        lg, d = snap["log"], snap.get("diverted", {})
        return (f"kernel path: new conversations redirected to the default listeners: tcp {d.get('tcp', 0)}, "
                f"udp {d.get('udp', 0)}; log lines {lg['written']} (dropped {lg['dropped']}, failed {lg['failed']}), "
                + _observer_summary(lg))
    p, c, lg = snap["packets"], snap["conversations"], snap["log"]
    return (f"packets seen {p['seen']}, rewritten {p['rewritten']}, passed {p['passed']}, "
            f"malformed {p['malformed']}, dropped {p['dropped']}, errors {p['errors']}; conversations {c['new']} "
            f"(in table {c['size']} on {c['routes']} routes, client port clashes {c['client_port_clashes']}, "
            f"kernel remaps {c['kernel_remaps']} (stale answers {p.get('stale_answers', 0)}: sockets closed "
            f"{c.get('stale_sockets_closed', 0)}, entries deleted {c.get('stale_entries_deleted', 0)}), evicted idle {c['evicted_idle']}, closed {c['evicted_closed']}, "
            f"cap {c['evicted_cap']}); new-conversation hook errors {p['hook_errors']}, "
            f"log lines {lg['written']} (dropped {lg['dropped']}, failed {lg['failed']}), "
            + _observer_summary(lg) + _kernel_summary(snap.get("kernel", {})) + _admission_summary(snap.get("admission", {})))


def _observer_summary(lg: dict) -> str:
    text = f"conntrack events lost {lg.get('events_lost', 0)}"
    ends = lg.get("ends")
    if not ends:
        return text
    if "unended" in ends:  # stopped: the ends made at the stop, and what has none
        made = ends["synthesized"]
        text += (f"; ends synthesized {sum(made.values())} (end event lost {made['event_lost']}, "
                 f"dump at stop failed {made['dump_failed']}), unended {ends['unended']}, "
                 f"unreadable entries skipped {ends['unreadable']}")
    return (text + f"; ends of earlier runs skipped {ends['earlier']}, "
            f"starts recovered from ends {ends['recovered']}")


def _admission_summary(admission: dict[str, int]) -> str:
    if not admission:
        return ""
    return "; admission dropped " + ", ".join(f"{proto} {n}" for proto, n in sorted(admission.items())) + \
        " new conversations"


def _kernel_summary(kernel: dict) -> str:
    parts = [f"{name} queue {q['queue']} dropped {q['queue_full']} (queue full) + {q['socket_full']} "
             f"(socket full) + {q.get('unreadable', 0)} (unreadable), waiting {q['waiting']}"
             for name, q in sorted(kernel.items())]
    return "; kernel: " + ", ".join(parts) if parts else ""
