"""[hooks] first_conversation: real commands, once per client or process, never in the records' way."""

from __future__ import annotations

import queue

from nftdivert.config import HooksConfig
from nftdivert.observers.hooks import Hooks


def start(client: str, process: dict | None = None, name: str = "c2.example") -> dict:
    rec = {"event": "start", "client": client, "original_destination": "198.51.100.7:443", "name": name,
           "protocol": "tcp", "time": "2026-12-06T04:00:00.000Z"}
    if process is not None:
        rec["process"] = process
    return rec


def hooked(argv, *records, timeout=60.0):
    written, hook_records = [], queue.Queue()
    hooks = Hooks(HooksConfig(first_conversation=tuple(argv), timeout=timeout), hook_records.put)
    put = hooks.watching(written.append)
    for rec in records:
        put(rec)
    return hooks, written, hook_records


def test_once_per_client_address_with_placeholders_and_its_status_and_output_logged():
    hooks, written, got = hooked(["sh", "-c", 'echo "$0 $1 $2"; exit 3', "{client_address}", "{name}",
                                  "{original_destination}"],
                                 start("192.0.2.2:4000"), start("192.0.2.2:4001"), start("[2001:db8:1::2]:4000"))
    first, second = got.get(timeout=30), got.get(timeout=30)
    hooks.close()
    assert len(written) == 3 and got.empty()  # every record passed on; two clients, two hooks
    by_client = {r["client_address"]: r for r in (first, second)}
    assert by_client["192.0.2.2"]["exit_status"] == 3
    assert by_client["192.0.2.2"]["output"] == "192.0.2.2 c2.example 198.51.100.7:443\n"
    assert by_client["2001:db8:1::2"]["hooked"] == "client 2001:db8:1::2"


def test_once_per_process_where_the_log_names_it():
    one, two = {"pid": 7, "host_pid": 4007, "command": "curl x"}, {"pid": 8, "host_pid": 4008, "command": "wget"}
    hooks, written, got = hooked(["echo", "{pid}", "{host_pid}", "{command}"], start("10.0.0.2:1", one),
                                 start("10.0.0.2:2", one), start("10.0.0.2:3", two))
    outputs = sorted(got.get(timeout=30)["output"] for _ in range(2))
    hooks.close()
    assert outputs == ["7 4007 curl x\n", "8 4008 wget\n"] and got.empty()


def test_a_hook_never_delays_the_record(tmp_path):
    go = tmp_path / "go"  # the hook runs until the test creates this file
    hooks, written, got = hooked(["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.05; done; echo done', str(go)],
                                 start("192.0.2.2:1"))
    assert [r["event"] for r in written] == ["start"] and got.empty()  # passed on; the hook still runs
    go.touch()
    assert got.get(timeout=30)["output"] == "done\n"
    hooks.close()


def test_a_hook_still_running_at_stop_is_killed_and_logged():
    hooks, _, got = hooked(["sh", "-c", "exec tail -f /dev/null"], start("192.0.2.2:1"))
    hooks.close()
    rec = got.get(timeout=30)
    assert rec["exit_status"] == -9 or rec.get("error")  # killed, or stopped before it could start


def test_a_hook_that_cannot_start_or_runs_too_long_is_logged():
    hooks, _, got = hooked(["/nonexistent/hook"], start("192.0.2.2:1"))
    assert got.get(timeout=30)["error"] == "No such file or directory"
    hooks.close()
    hooks, _, got = hooked(["sh", "-c", "exec tail -f /dev/null"], start("192.0.2.2:1"), timeout=0.5)
    rec = got.get(timeout=30)
    hooks.close()
    assert rec["error"] == "killed after 0.5 s" and rec["exit_status"] == -9


def test_the_text_log_shows_hook_reload_and_custom_records():
    from nftdivert.observers.convlog import text_line

    at = "2026-12-06T04:00:00.000Z"
    assert text_line({"time": at, "event": "hook", "hooked": "pid 5", "argv": ["snap", "c2.example"],
                      "exit_status": 3}).endswith("hook   pid 5: snap c2.example -> exit 3")
    assert text_line({"time": at, "event": "reload", "sections": ["custom", "dns", "http"]}).endswith(
        "reload custom, dns, http")
    assert text_line({"time": at, "event": "reload", "error": "dns.one_address = 'x': not an IP address"}).endswith(
        "reload refused: dns.one_address = 'x': not an IP address")
    line = text_line({"time": at, "event": "custom", "client": "192.0.2.2:4000", "listener": "tcp-echo",
                      "original_destination": "198.51.100.7:4444", "rule": "banner", "sent": 14, "received": 0,
                      "error": "ValueError: bad"})
    assert line.endswith("192.0.2.2:4000 -> 198.51.100.7:4444 rule banner: sent 14 bytes, got 0, error: ValueError: bad")
