"""End to end: `[worker] metrics_file` holds the counters `status` shows, in
Prometheus's text format, and they move with traffic; `metrics_listen` serves
them over HTTP; the file and the endpoint go with the run."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import harness
import netns

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]


def _read(path) -> dict[tuple[str, frozenset], float]:
    try:
        return _parse(path.read_text())
    except FileNotFoundError:
        return {}


def _parse(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(ns) -> str:
    proc = ns.run("curl", "-sS", "--max-time", "5", "-D", "/dev/stderr", "http://127.0.0.1:9464/metrics",
                  check=False)
    return proc.stdout if proc.returncode == 0 and "version=0.0.4" in proc.stderr else ""


def _value(got: dict, name: str, **labels) -> float:
    return got.get((name, frozenset({"table": harness.TABLE, **labels}.items())), -1)


def test_the_metrics_file_follows_the_counters_and_goes_with_the_run(tmp_path):
    prom = tmp_path / "nftdivert.prom"
    host = harness.build_local_host(netns)
    div = None
    try:
        config = harness.config_text(mode="local") + f'\n[worker]\nmetrics_file = "{prom}"\n' \
            'metrics_listen = "127.0.0.1:9464"\n'
        div = harness.Diverter(host, tmp_path, config, name="metrics").start()
        first = harness.wait_for(lambda: _read(prom), 10, "the metrics file")
        assert _value(first, "nftdivert_up") == 1
        if harness.KERNEL_PATH:
            counter, labels = "nftdivert_diverted_total", {"protocol": "tcp"}
        else:
            counter, labels = "nftdivert_conversations_total", {}
        before = _value(first, counter, **labels)
        listener_before = _value(first, "nftdivert_listener_conversations_total", listener="tcp-echo")
        assert before >= 0 and listener_before >= 0, first
        for i in range(3):
            out = host.run("sh", "-c", f"echo metrics-{i} | nc -q1 -w5 198.51.100.{70 + i} 4444", timeout=15)
            assert out.stdout.strip() == f"metrics-{i}", out

        def moved():
            now = _read(prom)
            return now if (_value(now, counter, **labels) >= before + 3 and _value(
                now, "nftdivert_listener_conversations_total", listener="tcp-echo") >= listener_before + 3) else None

        now = harness.wait_for(moved, 15, "the counters in the metrics file to count 3 conversations",
                           detail=lambda: prom.read_text())
        assert _value(now, "nftdivert_log_records_total", outcome="written") >= 3
        served = _parse(_scrape(host))  # the endpoint renders the same stats, at least as new
        assert _value(served, counter, **labels) >= before + 3, served
        assert _value(served, "nftdivert_up") == 1
        assert _value(now, "nftdivert_stats_updated_seconds") > _value(first, "nftdivert_stats_updated_seconds")
        print(f"\nmetrics file: {prom}")
        div.stop_and_check()
        assert not prom.exists() and not list(tmp_path.glob(".nftdivert.prom.*"))
        assert _scrape(host) == ""  # nothing serves it any more
    finally:
        if div is not None:
            div.kill()
        host.delete()
