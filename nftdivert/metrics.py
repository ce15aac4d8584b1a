"""The counters `nftdivert status` shows, in Prometheus's text exposition format
(0.0.4): a file for node_exporter's textfile collector, rewritten with the
stats file, and an HTTP endpoint that renders the stats file when scraped.
`render` is pure: a stats snapshot (runner.py) in, text out.

Known counters get a name, a type and help of their own. A number in the
snapshot this table does not know yet (a counter added later) is exported
too, as `nftdivert_<section>_<key>` without a type, so nothing `status` shows
is missing here.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator

from nftdivert.config import listen_address

PREFIX = "nftdivert"

# (section, key) -> (metric, type, help, label name, label value); key None: every key of a
# section that is a mapping of names to numbers, the key becoming the label's value.
KNOWN: dict[tuple[str, str | None], tuple[str, str, str, str, str]] = {
    ("packets", "seen"): ("packets_seen_total", "counter", "diverted packets the queue worker got", "", ""),
    **{("packets", k): ("packets_total", "counter", "the queue worker's verdicts and failures, by result",
                        "result", k)
       for k in ("rewritten", "passed", "malformed", "dropped", "errors", "hook_errors", "stale_answers")},
    ("unfit", None): ("unfit_packets_total", "counter", "packets the worker could not parse, by reason",
                      "reason", ""),
    ("conversations", "new"): ("conversations_total", "counter", "new conversations the worker saw", "", ""),
    ("conversations", "client_port_clashes"): ("client_port_clashes_total", "counter",
                                               "conversations given an alias client port", "", ""),
    ("conversations", "kernel_remaps"): ("kernel_remaps_total", "counter",
                                         "conversations learned from conntrack after the kernel remapped their port",
                                         "", ""),
    **{("conversations", f"stale_{what}"): ("stale_answers_cleared_total", "counter",
                                            "stale answers to kernel remaps, by what was cleared", "cleared", what)
       for what in ("sockets_closed", "entries_deleted")},
    ("conversations", "size"): ("conversation_table_size", "gauge", "conversations in the worker's table", "", ""),
    ("conversations", "routes"): ("conversation_table_routes", "gauge", "routes in the worker's table", "", ""),
    ("conversations", "lingering"): ("conversation_table_lingering", "gauge",
                                     "listener-side tuples kept free after their conversation", "", ""),
    **{("conversations", f"evicted_{why}"): ("conversations_evicted_total", "counter",
                                             "conversations dropped from the worker's table, by why", "why", why)
       for why in ("idle", "closed", "cap")},
    **{("log", k): ("log_records_total", "counter", "conversation log records, by outcome", "outcome", k)
       for k in ("written", "dropped", "failed")},
    ("log", "events_lost"): ("conntrack_event_overruns_total", "counter",
                             "times the kernel dropped conntrack events for the observer", "", ""),
    ("worker_conversations", None): ("queue_worker_conversations_total", "counter",
                                     "new conversations each queue worker took (several workers)", "worker", ""),
    ("admission", None): ("admission_dropped_total", "counter",
                          "new conversations beyond their client's share, dropped before the queue", "protocol", ""),
    ("diverted", None): ("diverted_total", "counter",
                         "kernel path: new conversations redirected to the default listeners", "protocol", ""),
    ("spoofed", ""): ("spoofed_dropped_packets_total", "counter",
                      "packets dropped for a source their interface does not route to", "", ""),
    **{("syslog", k): ("syslog_records_total", "counter",
                       "records for the syslog collector, by outcome (sent: its connection took them)", "outcome", k)
       for k in ("sent", "dropped")},
    ("syslog", "buffered"): ("syslog_buffered_records", "gauge", "records waiting for the syslog collector", "", ""),
    ("syslog", "connections"): ("syslog_connections_total", "counter", "connections made to the syslog collector",
                                "", ""),
    ("syslog", "connected"): ("syslog_connected", "gauge", "1 while connected to the syslog collector", "", ""),
    ("pool_unanswered", ""): ("listener_pool_unanswered_total", "counter",
                              "DNS pool questions another listener process asked the first, unanswered in time", "", ""),
}
# Sections of mappings of mappings: the outer key is a label, each inner number a metric.
NESTED: dict[str, tuple[str, dict[str, tuple[str, str, str, str, str]]]] = {
    "listeners": ("listener", {
        "conversations": ("listener_conversations_total", "counter", "conversations a listener took", "", ""),
        "bytes_received": ("listener_received_bytes_total", "counter", "bytes a listener got from clients", "", ""),
    }),
    "kernel": ("queue", {
        **{k: ("queue_dropped_total", "counter", "packets the kernel (or the worker, unread) dropped at a queue",
               "reason", k) for k in ("queue_full", "socket_full", "unreadable")},
        "waiting": ("queue_waiting", "gauge", "packets queued and not yet given a verdict", "", ""),
        "queue": ("queue_number", "gauge", "the NFQUEUE number of a queue", "", ""),
    }),
}
SKIP = {"pid", "updated", "path"}


def render(snapshot: dict, table: str) -> str:
    """The snapshot as Prometheus text: one HELP and TYPE per metric, its samples together."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    base = {"table": table}
    _add(families, "up", "gauge", "1 while nftdivert run runs for this table", base, 1)
    _add(families, "stats_updated_seconds", "gauge", "when these counters were read (Unix time)", base,
         snapshot.get("updated", 0))
    _add(families, "info", "gauge", "the run's divert path", {**base, "divert_path": snapshot.get("path", "queue")}, 1)
    for section, value in snapshot.items():
        if section in SKIP:
            continue
        for name, kind, help_, labels, number in _samples(section, value):
            _add(families, name, kind, help_, {**base, **labels}, number)
    lines = []
    for name, (kind, help_, samples) in families.items():
        lines.append(f"# HELP {PREFIX}_{name} {_escape_help(help_)}")
        lines.append(f"# TYPE {PREFIX}_{name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"


def _samples(section: str, value) -> Iterator[tuple[str, str, str, dict[str, str], float]]:
    if _number(value):  # a top-level number, like "spoofed"
        name, kind, help_, label, fixed = KNOWN.get((section, ""), (_generic(section), "untyped",
                                                                  f"the stats snapshot's {section}", "", ""))
        yield name, kind, help_, ({label: fixed} if label else {}), value
        return
    if not isinstance(value, dict):
        return
    if section in NESTED:
        outer, inner = NESTED[section]
        for who, counts in sorted(value.items()):
            for key, number in sorted(counts.items()) if isinstance(counts, dict) else ():
                if _number(number):
                    name, kind, help_, label, fixed = inner.get(key, (_generic(section, key), "untyped",
                                                                      f"the stats snapshot's {section} {key}", "", ""))
                    yield name, kind, help_, {outer: str(who), **({label: fixed} if label else {})}, number
        return
    for key, number in sorted(value.items()):
        if not _number(number):
            continue
        if (section, key) in KNOWN:
            name, kind, help_, label, fixed = KNOWN[(section, key)]
            yield name, kind, help_, ({label: fixed} if label else {}), number
        elif (section, None) in KNOWN:
            name, kind, help_, label, _ = KNOWN[(section, None)]
            yield name, kind, help_, {label: str(key)}, number
        else:
            yield _generic(section, key), "untyped", f"the stats snapshot's {section} {key}", {}, number


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _generic(*parts: str) -> str:
    # Metric names are [a-zA-Z_:][a-zA-Z0-9_:]*; anything else becomes "_".
    return "_".join("".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in p) for p in parts)


def _add(families: dict, name: str, kind: str, help_: str, labels: dict[str, str], number: float) -> None:
    family = families.setdefault(name, (kind, help_, []))
    text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    family[2].append(f"{PREFIX}_{name}{{{text}}} {_format(number)}")


def _format(number: float) -> str:
    return str(number) if isinstance(number, int) else repr(float(number))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def write(path: str, snapshot: dict, table: str) -> None:
    """Atomically: node_exporter never reads half a file (it reads only *.prom, so the
    temporary name, in the same directory, is never read at all)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(render(snapshot, table))
    tmp.chmod(0o644)  # node_exporter runs as a user of its own
    tmp.replace(target)


def remove(path: str) -> None:
    """When the run stops: node_exporter then stops exporting its counters."""
    if path:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def serve(listen: str, stats_file: Path, table: str, stack: ExitStack) -> None:
    """Serve GET /metrics on `listen` ("" none) until the stack closes: the stats file the run keeps
    writing, rendered at each scrape. One request at a time, each with a deadline, in a thread."""
    if not listen:
        return
    address, port = listen_address(listen)

    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a client that never finishes its request holds the endpoint no longer

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            try:
                body = render(json.loads(stats_file.read_text()), table).encode()
            except (OSError, ValueError):
                self.send_error(503, "no counters yet")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass  # scrapes are not the conversation log's business, nor stderr's

    server_class = type("Server", (HTTPServer,), {"address_family": _family(address)})
    server = server_class((address, port), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="metrics", daemon=True)
    thread.start()
    stack.callback(server.server_close)
    stack.callback(server.shutdown)  # first: the loop ends, then the socket closes


def _family(address: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in address else socket.AF_INET
