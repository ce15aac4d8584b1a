"""Our records under Elastic Common Schema names (pure: a record in, a record out).

`[worker] log_schema = "ecs"` applies this where JSON lines are written (the
log file and the syslog collector), nowhere else: the summary, the hooks and
the text log keep reading our own names. What ECS has a field for goes
there (source.*, destination.*, network.*, event.*, dns.*, tls.*, http.*,
url.*, process.*, and the profile as labels.profile); everything else keeps
its name under `nftdivert.`, so nothing a record says is lost. docs/reference/log-schema.md has the table.
"""
from __future__ import annotations

import ipaddress

from nftdivert.observers.convrecords import split_endpoint

ECS_VERSION = "8.11.0"
# ECS's names of the protocols ours calls tcp, udp, icmp, icmpv6.
_TRANSPORT = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}
_IANA = {"tcp": "6", "udp": "17", "icmp": "1", "icmpv6": "58"}
# Ours -> ECS, for any record; then per event (its own meaning of `name`, say).
_COMMON = dict((("time", "@timestamp"), ("event", "event.action"), ("community_id", "network.community_id"),
                ("interface", "observer.ingress.interface.name"), ("client_address", "source.ip"),
                ("name", "destination.domain"), ("profile", "labels.profile")))  # pairs: no record is built here
_BY_EVENT = {
    "dns": {"name": "dns.question.name", "type": "dns.question.type", "rcode": "dns.response_code"},
    "tls": {"sni": "tls.client.server_name"},
    "http": {"method": "http.request.method", "url": "url.original", "status": "http.response.status_code"},
}
_TYPES = {"start": ["connection", "start"], "end": ["connection", "end"]}


def _put(out: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[leaf] = value


def _endpoint(out: dict, side: str, text: str) -> None:
    """Our endpoints always hold an address (conntrack's, or a socket's), never a name."""
    address, port = split_endpoint(text)
    ends = out.setdefault(side, {})
    ends["address"] = ends["ip"] = address
    if port is not None:
        ends["port"] = port


def _flows(out: dict, sent: dict | None, received: dict | None) -> None:
    for side, counts in (("source", sent), ("destination", received)):
        if counts:
            _put(out, f"{side}.packets", counts["packets"])
            _put(out, f"{side}.bytes", counts["bytes"])
    if sent and received:
        _put(out, "network.packets", sent["packets"] + received["packets"])
        _put(out, "network.bytes", sent["bytes"] + received["bytes"])


_PROCESS = {"pid": "process.pid", "command": "process.command_line"}


def _process(out: dict, proc: dict) -> None:
    for key, value in proc.items():
        if key == "uid":
            _put(out, "user.id", str(value))  # ECS's ids are strings
        else:
            _put(out, _PROCESS.get(key, f"nftdivert.process.{key}"), value)


def to_ecs(ours: dict) -> dict:
    """The record under ECS names (nested objects, as Elasticsearch stores them)."""
    event = ours.get("event", "")
    names = {**_COMMON, **_BY_EVENT.get(event, {})}
    out: dict = {}
    _put(out, "@timestamp", ours.get("time"))
    _put(out, "ecs.version", ECS_VERSION)
    _put(out, "event.kind", "event")
    _put(out, "event.module", "nftdivert")
    _put(out, "event.dataset", "nftdivert.log")
    _put(out, "event.category", ["network"])
    _put(out, "event.type", _TYPES.get(event, ["info"]))
    for key, value in ours.items():
        if key == "client":
            _endpoint(out, "source", value)
        elif key == "original_destination":
            _endpoint(out, "destination", value)
        elif key == "protocol":
            _put(out, "network.transport", _TRANSPORT.get(value, value))
            _put(out, "network.iana_number", _IANA.get(value, value))
        elif key == "duration" and value is not None:
            _put(out, "event.duration", round(value * 1e9))  # ECS counts nanoseconds
        elif key == "process" and isinstance(value, dict):
            _process(out, value)
        elif key == "answer" and event == "dns" and _is_address(value):
            _put(out, "dns.resolved_ip", [value])
        elif key in ("sent", "received"):
            continue  # below, both at once
        elif key in names:
            _put(out, names[key], value)
        else:
            _put(out, f"nftdivert.{key}", value)
    if "sent" in ours or "received" in ours:
        _flows(out, ours.get("sent"), ours.get("received"))
        _put(out, "nftdivert.sent", ours.get("sent"))
        _put(out, "nftdivert.received", ours.get("received"))
    if "source" in out and "ip" in out["source"]:
        _put(out, "network.type", "ipv6" if ":" in out["source"]["ip"] else "ipv4")
    return out


def _is_address(value) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
