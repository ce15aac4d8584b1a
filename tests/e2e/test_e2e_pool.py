"""The DNS pool with several listener processes, end to end: `nftdivert sandbox` with
`listener_processes = 2`. The pool lives in the first process; a DNS over HTTPS request,
a `[[custom]]` rule by `names` or a SOCKS target's name in the other asks it there, so every client gets the
answer one process would give, whichever process the kernel hands its connection.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import harness
from conftest import REPO

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

RUNS = 40

CLIENTS = r"""
import json, socket

got = []
for i in range(RUNS):
    try:
        with socket.create_connection((f"r{i}.rule.example", 4446), timeout=5) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    break
                data += chunk
            got.append(data.decode("latin-1"))
    except OSError as exc:
        got.append(f"{type(exc).__name__}: {exc}")
json.dump(got, open("custom.json", "w"))
""".replace("RUNS", str(RUNS))

SCRIPT = r"""
cd "$D"
for i in $(seq 0 RUNS_1); do
  curl -sS --max-time 10 -o doh$i.txt --doh-url https://dns.example/dns-query http://name$i.example/ 2> doh$i.err
  echo $? > doh$i.rc
done
python3 clients.py 2> clients.err
for i in $(seq 0 RUNS_1); do  # curl resolves the name itself: the proxy is asked for an address
  curl -sS --max-time 10 -o /dev/null --socks5 198.51.100.89:1080 http://s$i.socks.example/ 2> socks$i.err
  echo $? > socks$i.rc
done
""".replace("RUNS_1", str(RUNS - 1))

CONFIG = """
[[custom]]
name = "named"
protocol = "tcp"
ports = [4446]
names = ["*.rule.example"]
static = "NAMED\\n"
"""


def _sandbox(work) -> tuple[list[dict], str]:
    """harness.sandbox_records, with the stop summary (stderr) too."""
    path = work / "sandbox.toml"
    path.write_text("listener_processes = 2\n" + harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n'
                    + f'[tls]\nstate_dir = "{work / "state"}"\n' + CONFIG)
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work))
    env.pop("SUDO_UID", None)
    argv = [sys.executable, "-m", "nftdivert", "sandbox", "-c", str(path), "--timeout", "200", "--", "sh", "-c", SCRIPT]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=260)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")], proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("pool")
    os.chmod(work, 0o755)
    (work / "clients.py").write_text(CLIENTS)
    records, stderr = _sandbox(work)
    found = re.search(r"listener processes' conversations (\d+) \+ (\d+) \(DNS pool questions unanswered (\d+)\)",
                      stderr)
    assert found, stderr
    first, second, unanswered = map(int, found.groups())
    # Both took some (the kernel hashes each connection's ports; all of them on one would be about 2^-200),
    # and the other process's questions were all answered.
    assert first and second and unanswered == 0, found.group(0)
    return work, records


def test_every_dns_over_https_lookup_is_answered_from_the_pool(run):
    work, records = run
    for i in range(RUNS):
        assert (work / f"doh{i}.rc").read_text().strip() == "0", (work / f"doh{i}.err").read_text()
        asked = [r for r in records if r.get("event") == "dns" and r["name"] == f"name{i}.example" and r["type"] == "A"]
        assert asked and asked[0]["answer"].startswith("198.18."), asked
        req = [r for r in records if r.get("event") == "http" and r.get("url") == f"http://name{i}.example/"]
        assert req and req[0]["name"] == f"name{i}.example", req
        assert req[0]["original_destination"].startswith(asked[0]["answer"] + ":"), (req, asked)
    doh = [r for r in records if r.get("event") == "http" and r.get("url") == "https://dns.example/dns-query"]
    assert len(doh) >= RUNS and all(r["doh"] is True and r["status"] == 200 for r in doh)


def test_every_connection_to_a_rule_by_names_gets_its_answer(run):
    work, records = run
    assert json.loads((work / "custom.json").read_text()) == ["NAMED\n"] * RUNS, (work / "clients.err").read_text()
    named = [r for r in records if r.get("event") == "custom" and r.get("rule") == "named"]
    assert len(named) == RUNS, named


def test_every_socks_target_address_is_named(run):
    work, records = run
    asked = {r["answer"]: r["name"] for r in records
             if r.get("event") == "dns" and r["name"].endswith(".socks.example") and r["type"] in ("A", "AAAA")}
    proxied = [r for r in records if r.get("event") == "proxy" and r.get("kind") == "socks5"]
    assert len(proxied) == RUNS, proxied
    for i in range(RUNS):
        assert (work / f"socks{i}.rc").read_text().strip() == "0", (work / f"socks{i}.err").read_text()
    for r in proxied:
        address = r["target"].rpartition(":")[0].strip("[]")
        assert r.get("target_name") == asked[address], r
