"""End to end: `[worker] metrics_file` holds the counters `status` shows, in
Prometheus's text format, and they move with traffic; the file goes with the run."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import lab
import netns

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]


def _read(path) -> dict[tuple[str, frozenset], float]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(got: dict, name: str, **labels) -> float:
    return got.get((name, frozenset({"table": lab.TABLE, **labels}.items())), -1)


def test_the_metrics_file_follows_the_counters_and_goes_with_the_run(tmp_path):
    prom = tmp_path / "nftdivert.prom"
    host = lab.build_local_host(netns)
    div = None
    try:
        config = lab.config_text(mode="local") + f'\n[worker]\nmetrics_file = "{prom}"\n'
        div = lab.Diverter(host, tmp_path, config, name="metrics").start()
        first = lab.wait_for(lambda: _read(prom), 10, "the metrics file")
        assert _value(first, "nftdivert_up") == 1
        if lab.KERNEL_PATH:
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

        now = lab.wait_for(moved, 15, "the counters in the metrics file to count 3 conversations",
                           detail=lambda: prom.read_text())
        assert _value(now, "nftdivert_log_records_total", outcome="written") >= 3
        assert _value(now, "nftdivert_stats_updated_seconds") > _value(first, "nftdivert_stats_updated_seconds")
        print(f"\nmetrics file: {prom}")
        div.stop_and_check()
        assert not prom.exists() and not list(tmp_path.glob(".nftdivert.prom.*"))
    finally:
        if div is not None:
            div.kill()
        host.delete()
