"""The stats snapshot in Prometheus's text format, read back by the reference parser."""

from __future__ import annotations

import pytest

from nftdivert.config import from_mapping
from nftdivert.errors import ConfigError
from prometheus_client.parser import text_string_to_metric_families

from nftdivert import metrics

QUEUE_SNAPSHOT = {
    "pid": 4242, "updated": 1764990000.5,
    "packets": {"seen": 10, "rewritten": 8, "passed": 1, "malformed": 1, "dropped": 0, "errors": 0,
                "hook_errors": 0},
    "log": {"written": 4, "dropped": 0, "failed": 0, "events_lost": 2},
    "unfit": {"truncated": 1},
    "conversations": {"new": 2, "client_port_clashes": 0, "kernel_remaps": 1, "size": 2, "routes": 2,
                      "evicted_idle": 0, "evicted_closed": 1, "evicted_cap": 0, "lingering": 1},
    "listeners": {"tcp-echo": {"conversations": 1, "bytes_received": 5},
                  'we"ird\\name\n': {"conversations": 3, "bytes_received": 0}},
    "kernel": {"incoming": {"queue": 0, "queue_full": 3, "socket_full": 0, "waiting": 0, "unreadable": 0}},
    "admission": {"tcp": 7},
    "spoofed": 9,
    "brand_new": {"widgets": 5, "label": "text is skipped"},
}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def one(got: dict, name: str, **labels) -> float:
    return got[(name, frozenset({"table": "nftdivert", **labels}.items()))]


def test_every_counter_of_the_queue_path_parses_with_its_labels():
    text = metrics.render(QUEUE_SNAPSHOT, "nftdivert")
    got = samples(text)
    assert one(got, "nftdivert_up") == 1
    assert one(got, "nftdivert_info", divert_path="queue") == 1
    assert one(got, "nftdivert_stats_updated_seconds") == 1764990000.5
    assert one(got, "nftdivert_packets_seen_total") == 10
    assert one(got, "nftdivert_packets_total", result="rewritten") == 8
    assert one(got, "nftdivert_unfit_packets_total", reason="truncated") == 1
    assert one(got, "nftdivert_conversations_total") == 2
    assert one(got, "nftdivert_conversations_evicted_total", why="closed") == 1
    assert one(got, "nftdivert_conversation_table_size") == 2
    assert one(got, "nftdivert_log_records_total", outcome="written") == 4
    assert one(got, "nftdivert_conntrack_event_overruns_total") == 2
    assert one(got, "nftdivert_listener_conversations_total", listener="tcp-echo") == 1
    assert one(got, "nftdivert_listener_conversations_total", listener='we"ird\\name\n') == 3  # escaped, intact
    assert one(got, "nftdivert_queue_dropped_total", queue="incoming", reason="queue_full") == 3
    assert one(got, "nftdivert_queue_waiting", queue="incoming") == 0
    assert one(got, "nftdivert_admission_dropped_total", protocol="tcp") == 7
    assert one(got, "nftdivert_spoofed_dropped_packets_total") == 9
    assert one(got, "nftdivert_brand_new_widgets") == 5  # a counter this module does not know yet
    # One HELP and TYPE per family, its samples together: what the text format requires.
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["nftdivert_packets"] == "counter" and families["nftdivert_queue_waiting"] == "gauge"


def test_the_kernel_path_snapshot_parses():
    snap = {"pid": 1, "updated": 2.0, "path": "kernel", "diverted": {"tcp": 3, "udp": 4},
            "log": {"written": 1, "dropped": 0, "failed": 0, "events_lost": 0},
            "listeners": {"udp-echo": {"conversations": 4, "bytes_received": 40}}}
    got = samples(metrics.render(snap, "lab_2"))
    assert got[("nftdivert_diverted_total", frozenset({"table": "lab_2", "protocol": "udp"}.items()))] == 4
    assert got[("nftdivert_info", frozenset({"table": "lab_2", "divert_path": "kernel"}.items()))] == 1


def test_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "nftdivert.prom"
    target.write_text("old\n")
    metrics.write(str(target), QUEUE_SNAPSHOT, "nftdivert")
    assert samples(target.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["nftdivert.prom"]
    assert target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(OSError):
        metrics.write(str(tmp_path / "missing" / "x.prom"), QUEUE_SNAPSHOT, "nftdivert")


@pytest.mark.parametrize("value, reason", [
    ("0.0.0.0:9464", "wildcard"), ("[::]:9464", "wildcard"), ("127.0.0.1", "an address and a port"),
    ("127.0.0.1:0", "an address and a port"), ("127.0.0.1:65536", "an address and a port"),
    ("metrics.example:9464", "does not appear to be"), (9464, "a string"),
])
def test_a_bad_metrics_listen_names_the_key(value, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"worker": {"metrics_listen": value}})
    assert info.value.key == "worker.metrics_listen" and reason in str(info.value)


def test_good_metrics_listen_values():
    for value in ("127.0.0.1:9464", "[::1]:9464", "192.0.2.1:9100", ""):
        assert from_mapping({"worker": {"metrics_listen": value}}).worker.metrics_listen == value


def test_the_syslog_sender_s_counters_have_names_and_types():
    snap = {"pid": 1, "updated": 2.0, "path": "kernel",
            "syslog": {"sent": 49, "buffered": 3, "dropped": 23, "connections": 2, "connected": 1}}
    text = metrics.render(snap, "nftdivert")
    got = samples(text)
    assert one(got, "nftdivert_syslog_records_total", outcome="sent") == 49
    assert one(got, "nftdivert_syslog_records_total", outcome="dropped") == 23
    assert one(got, "nftdivert_syslog_buffered_records") == 3
    assert one(got, "nftdivert_syslog_connections_total") == 2 and one(got, "nftdivert_syslog_connected") == 1
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families["nftdivert_syslog_records"] == "counter" and families["nftdivert_syslog_buffered_records"] == "gauge"
