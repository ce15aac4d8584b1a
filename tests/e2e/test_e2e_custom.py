"""Answers the analyst writes ([[custom]]), end to end: real clients in `nftdivert sandbox`.

The README's examples are taken from README.md by their markers and run
here as written (only the script's path is this test's), so they cannot rot.
What the listener answers does not depend on the queue backend: any_backend.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import lab
from conftest import REPO, nftdivert_argv

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]


def readme_example(marker: str) -> str:
    """The code block right after `<!-- answers: marker -->` in README.md."""
    text = (REPO / "README.md").read_text()
    found = re.search(rf"<!-- answers: {re.escape(marker)} -->\n```\w+\n(.*?)```\n", text, re.S)
    assert found, f"README.md has no example marked {marker}"
    return found.group(1)


CLIENTS = r'''
import json, socket

def save(name, value):
    with open(name, "w") as out:
        json.dump(value, out)

def tcp(name, port, send=b"", want=1 << 16):
    with socket.create_connection((name, port), timeout=10) as s:
        if send:
            s.sendall(send)
        got = b""
        while len(got) < want and (more := s.recv(65536)):
            got += more
        return got.decode()

save("banner.json", tcp("banner.example", 4444, want=14))
save("file.json", tcp("file.example", 4445, b"hello", want=len(open("answer.bin", "rb").read())))
save("script.json", [tcp("script.example", 4446, b"boom"), tcp("script.example", 4446, b"ping")])

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(10)
    s.sendto(b"ping", (socket.gethostbyname("static-udp.example"), 9998))
    first = s.recv(100).decode()
    s.sendto(b"ping", (socket.gethostbyname("static-udp.example"), 9998))
    second = s.recv(100).decode()
    save("static_udp.json", [first, second])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(10)
    beacon = (socket.gethostbyname("beacon.example"), 9999)
    for data in (b"bot7|2", b"junk", b"bot7|3"):
        s.sendto(data, beacon)
    save("beacon.json", [s.recv(200).decode(), s.recv(200).decode()])  # "junk" raised: no answer
'''

TCP_SCRIPT = '''
async def tcp(conn):
    if conn.first == b"boom":
        raise RuntimeError("the script failed")
    await conn.send(b"pong from " + conn.name.encode())
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("custom")
    os.chmod(work, 0o777)
    (work / "clients.py").write_text(CLIENTS)
    (work / "answer.bin").write_bytes(b"\x7fELF-like bytes from a file\n")
    (work / "beacon.py").write_text(readme_example("beacon.py"))
    (work / "c2.py").write_text(TCP_SCRIPT)
    config = work / "sandbox.toml"
    config.write_text(
        lab.DIVERT_PATH_LINE + f'[queue]\nbackend = "{lab.BACKEND}"\n[tls]\nstate_dir = "{work / "state"}"\n'
        + readme_example("banner")
        + readme_example("beacon.toml").replace("/etc/nftdivert/beacon.py", str(work / "beacon.py"))
        + f'[[custom]]\nname = "file"\nprotocol = "tcp"\nports = [4445]\nfile = "{work / "answer.bin"}"\n'
          'when = "after_first_message"\n'
        + f'[[custom]]\nname = "c2"\nprotocol = "tcp"\nports = [4446]\nnames = ["*.example"]\n'
          f'script = "{work / "c2.py"}"\n'
        + '[[custom]]\nname = "pong"\nprotocol = "udp"\nports = [9998]\nstatic = "PONG"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--timeout", "60", "--",
                                         "sh", "-c", f'cd "{work}" && python3 clients.py'),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return work, records


def got(work, name: str):
    return json.loads((work / name).read_text())


def custom(records, rule: str) -> list[dict]:
    found = [r for r in records if r.get("event") == "custom" and r.get("rule") == rule]
    assert found, f"no custom record of {rule}: {[r for r in records if r.get('event') == 'custom']}"
    return found


def test_the_readme_banner_is_sent_on_4444(run):
    work, records = run
    assert got(work, "banner.json") == "220 c2 ready\r\n"
    rec = custom(records, "banner")[0]
    assert rec["name"] == "banner.example" and rec["original_destination"].endswith(":4444") and rec["sent"] == 14


def test_a_file_answers_after_the_first_message(run):
    work, records = run
    assert got(work, "file.json") == "\x7fELF-like bytes from a file\n"
    rec = custom(records, "file")[0]
    assert rec["received"] == 5 and rec["name"] == "file.example"


def test_a_script_that_raises_ends_only_its_own_conversation(run):
    work, records = run
    assert got(work, "script.json") == ["", "pong from script.example"]
    failed, answered = custom(records, "c2")
    assert failed["error"] == "RuntimeError: the script failed" and "error" not in answered


def test_udp_static_answer_per_datagram(run):
    work, records = run
    assert got(work, "static_udp.json") == ["PONG", "PONG"]
    assert len(custom(records, "pong")) == 2


def test_the_readme_beacon_decoder_answers_each_datagram_and_survives_junk(run):
    work, records = run
    assert got(work, "beacon.json") == ["TASK bot7 sleep 120 for beacon.example",
                                        "TASK bot7 sleep 180 for beacon.example"]
    recs = custom(records, "beacon")
    assert [r.get("error", "")[:10] for r in recs] == ["", "ValueError", ""]
    assert all(r["original_destination"].endswith(":9999") and r["name"] == "beacon.example" for r in recs)
