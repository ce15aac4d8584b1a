"""Answers the analyst writes ([[custom]]), end to end: real clients in `nftdivert sandbox`.

The documented examples are taken from docs/reference/listeners.md by their markers and run
here as written (only the script's path is this test's), so they cannot rot.
What the listener answers does not depend on the queue backend: any_backend.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

import harness
from conftest import REPO, nftdivert_argv

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

LISTENERS_PAGE = "docs/reference/listeners.md"


def documented_example(marker: str) -> str:
    """The code block right after `<!-- answers: marker -->` in the listeners reference."""
    text = (REPO / LISTENERS_PAGE).read_text()
    found = re.search(rf"<!-- answers: {re.escape(marker)} -->\n```\w+\n(.*?)```\n", text, re.S)
    assert found, f"{LISTENERS_PAGE} has no example marked {marker}"
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
save("fixed_name.json", tcp(socket.gethostbyname("c2.example"), 4444, want=14))  # its A, not its AAAA
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

DIG = r"""
cd "$D"
for q in "c2.example A" "x.c2.example A" "update.example A" "c2.example AAAA" "c2.example MX" "c2.example TXT" \
         "77.100.51.198.in-addr.arpa PTR"; do
    set -- $q
    dig +short +tries=1 +time=5 "$1" "$2" > "dig_$1_$2.txt" 2>&1
done
sed -n 's/^nameserver //p' /etc/resolv.conf > nameserver.txt
python3 clients.py
get() { out="$1"; shift; curl -sS --max-time 20 "$@" > "$out" 2>&1 || echo "exit $?" >> "$out"; }
get http_port.txt http://web.example:8080/x
get http_post.txt -X POST http://web.example/gate
get http_query.txt "http://web.example/q?id=7&x=1"
get http_slow.txt -o /dev/null -w '%{time_total}' http://slow.example/
get http_redirect.txt -o /dev/null -w '%{http_code} %{redirect_url}' http://old.example/
get http_close.txt http://drop.example/
get http_panel.txt -d hello "http://panel.example/gate.php?bot=7"
"""

HTTP_RULES = """
[[http.rules]]
ports = [8080]
body = "port 8080"
[[http.rules]]
method = "POST"
path = "/gate"
body = "posted"
[[http.rules]]
path = "/q"
query = {id = "7"}
body = "seven"
[[http.rules]]
host = "slow.example"
delay = 1.5
body = "slow"
[[http.rules]]
host = "old.example"
redirect = "https://new.example/"
[[http.rules]]
host = "drop.example"
close = true
"""

# Beside the documented ones: a record of each other type, for dig.
MORE_RECORDS = "".join(
    f'[[dns.records]]\nname = "{name}"\ntype = "{kind}"\nvalue = "{value}"\n' for name, kind, value in (
        ("c2.example", "AAAA", "2001:db8:77::1"), ("c2.example", "MX", "10 mail.c2.example"),
        ("c2.example", "TXT", "v=beacon key=abc"), ("77.100.51.198.in-addr.arpa", "PTR", "c2.example")))

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
    (work / "beacon.py").write_text(documented_example("beacon.py"))
    (work / "panel.py").write_text(documented_example("panel.py"))
    (work / "c2.py").write_text(TCP_SCRIPT)
    config = work / "sandbox.toml"
    config.write_text(
        harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n[tls]\nstate_dir = "{work / "state"}"\n'
        + documented_example("banner")
        + documented_example("beacon.toml").replace("/etc/nftdivert/beacon.py", str(work / "beacon.py"))
        + f'[[custom]]\nname = "file"\nprotocol = "tcp"\nports = [4445]\nfile = "{work / "answer.bin"}"\n'
          'when = "after_first_message"\n'
        + documented_example("dns") + MORE_RECORDS + HTTP_RULES
        + documented_example("panel.toml").replace("/etc/nftdivert/panel.py", str(work / "panel.py"))
        + '[hooks]\nfirst_conversation = ["echo", "first of", "{pid}", "{command}"]\n'
        + f'[[custom]]\nname = "c2"\nprotocol = "tcp"\nports = [4446]\nnames = ["*.example"]\n'
          f'script = "{work / "c2.py"}"\n'
        + '[[custom]]\nname = "pong"\nprotocol = "udp"\nports = [9998]\nstatic = "PONG"\n')
    return work, sandbox(work, config, DIG)


def sandbox(work, config, script: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work))
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--timeout", "60", "--", "sh", "-ec", script),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def got(work, name: str):
    return json.loads((work / name).read_text())


def custom(records, rule: str) -> list[dict]:
    found = [r for r in records if r.get("event") == "custom" and r.get("rule") == rule]
    assert found, f"no custom record of {rule}: {[r for r in records if r.get('event') == 'custom']}"
    return found


def test_the_readme_banner_is_sent_on_4444(run):
    work, records = run
    assert got(work, "banner.json") == "220 c2 ready\r\n"
    # Its own record, whichever order: with several listener processes, c2.example's may come first.
    [rec] = [r for r in custom(records, "banner") if r["name"] == "banner.example"]
    assert rec["original_destination"].endswith(":4444") and rec["sent"] == 14


def test_a_file_answers_after_the_first_message(run):
    work, records = run
    assert got(work, "file.json") == "\x7fELF-like bytes from a file\n"
    rec = custom(records, "file")[0]
    assert rec["received"] == 5 and rec["name"] == "file.example"


def test_a_script_that_raises_ends_only_its_own_conversation(run):
    work, records = run
    assert got(work, "script.json") == ["", "pong from script.example"]
    # By what each says, not by their order: with several listener processes the two
    # conversations' records may reach the log in either order.
    records = custom(records, "c2")
    failed = [r for r in records if "error" in r]
    answered = [r for r in records if "error" not in r]
    assert [r["error"] for r in failed] == ["RuntimeError: the script failed"], records
    assert [r["sent"] for r in answered] == [len("pong from script.example")], records


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


def dug(work, name: str, qtype: str) -> list[str]:
    return (work / f"dig_{name}_{qtype}.txt").read_text().split("\n")[:-1]


def test_dig_gets_each_fixed_record_type(run):
    work, _ = run
    assert dug(work, "c2.example", "A") == ["198.51.100.77"]
    assert dug(work, "x.c2.example", "A") == ["c2.example.", "198.51.100.77"]
    assert dug(work, "update.example", "A") == [(work / "nameserver.txt").read_text().strip()]
    assert dug(work, "c2.example", "AAAA") == ["2001:db8:77::1"]
    assert dug(work, "c2.example", "MX") == ["10 mail.c2.example."]
    assert dug(work, "c2.example", "TXT") == ['"v=beacon key=abc"']
    assert dug(work, "77.100.51.198.in-addr.arpa", "PTR") == ["c2.example."]


def test_a_fixed_name_is_logged_like_a_pooled_one(run):
    work, records = run
    assert got(work, "fixed_name.json") == "220 c2 ready\r\n"
    starts = [r for r in records if r.get("event") == "start" and r.get("original_destination") == "198.51.100.77:4444"]
    assert starts and starts[0]["name"] == "c2.example", starts
    assert sorted(r["name"] for r in custom(records, "banner")) == ["banner.example", "c2.example"]


def test_http_rules_by_port_method_and_query(run):
    work, records = run
    assert (work / "http_port.txt").read_text() == "port 8080"
    assert (work / "http_post.txt").read_text() == "posted"
    assert (work / "http_query.txt").read_text() == "seven"


def test_http_delay_redirect_and_close(run):
    work, records = run
    assert float((work / "http_slow.txt").read_text()) >= 1.5  # a lower bound only: machines differ in speed
    assert (work / "http_redirect.txt").read_text() == "302 https://new.example/"
    assert (work / "http_close.txt").read_text().endswith("exit 52\n")  # curl: empty reply from server
    closed = [r for r in records if r.get("event") == "http" and r.get("name") == "drop.example"]
    assert closed and closed[0]["closed"] is True


def test_the_readme_http_panel_script(run):
    work, records = run
    task = json.loads((work / "http_panel.txt").read_text())
    assert task["bot"] == "7" and task["got"] == 5 and task["asked"].endswith(":80")
    rec = [r for r in records if r.get("event") == "http" and r.get("name") == "panel.example"]
    assert rec and rec[0]["method"] == "POST" and rec[0]["status"] == 200


def test_a_hook_runs_once_per_process_on_its_first_conversation(run):
    _, records = run
    starts = [r for r in records if r.get("event") == "start"]
    processes = {r["process"]["host_pid"]: r["process"] for r in starts if "process" in r}
    hooks = [r for r in records if r.get("event") == "hook"]
    keys = [r["hooked"] for r in hooks]
    assert len(keys) == len(set(keys)), keys  # once each, however many conversations
    # Where the log names the process, the hook is per process; elsewhere per client address.
    # The log names a process only if it still holds its socket when the observer (nice 19)
    # asks: most of the battery's (dig, curl) live for milliseconds, so under load few are
    # named. Two named processes of one client address, with a hook each, show it is per process.
    assert {f"pid {p}" for p in processes} <= set(keys) and len(processes) >= 2, processes
    assert len(starts) > len(hooks)
    # A process's first conversation as the sandbox ends may find its hook stopped: it says so.
    ran = [r for r in hooks if r.get("error") != "not run: stopping" and r.get("exit_status") != -9]
    assert len(ran) > 3
    for rec in ran:
        assert rec["exit_status"] == 0 and rec["output"].startswith("first of "), rec
        if rec["hooked"].startswith("pid "):  # the placeholders filled from its conversation
            process = processes[int(rec["hooked"].split()[1])]
            assert rec["output"] == f"first of {process['pid']} {process['command']}\n"


ONE_ADDRESS = r"""
cd "$D"
dig +short +tries=1 +time=5 a.example A > one_a.txt
dig +short +tries=1 +time=5 b.example A > one_b.txt
python3 -c 'import socket; s = socket.create_connection(("b.example", 4444), timeout=10); print(s.recv(100).decode())' \
    > one_banner.txt
"""


def test_one_address_answers_every_name_and_the_log_names_the_last(tmp_path):
    os.chmod(tmp_path, 0o777)
    config = tmp_path / "one.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n[dns]\none_address = "198.51.100.1"\n'
                      + documented_example("banner"))
    records = sandbox(tmp_path, config, ONE_ADDRESS)
    assert (tmp_path / "one_a.txt").read_text() == (tmp_path / "one_b.txt").read_text() == "198.51.100.1\n"
    assert (tmp_path / "one_banner.txt").read_text().startswith("220 c2 ready")
    assert [r["name"] for r in custom(records, "banner")] == ["b.example"]
    starts = [r for r in records if r.get("event") == "start" and r.get("original_destination") == "198.51.100.1:4444"]
    assert starts and starts[0]["name"] == "b.example", starts


def test_a_script_that_does_not_load_is_refused_at_start_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    (tmp_path / "syntax.py").write_text("async def tcp(conn:\n")
    (tmp_path / "syntax.toml").write_text(f'[[custom]]\nprotocol = "tcp"\nscript = "{tmp_path / "syntax.py"}"\n')
    proc = subprocess.run(nftdivert_argv("render", "-c", str(tmp_path / "syntax.toml")), capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "custom[0].script" in proc.stderr and "does not load: SyntaxError" in proc.stderr
    # It compiles, but its import fails: the listeners refuse it when they start, and nothing runs.
    (tmp_path / "raises.py").write_text("import no_such_module_for_this_test\nasync def tcp(conn):\n    pass\n")
    (tmp_path / "raises.toml").write_text(f'[[custom]]\nprotocol = "tcp"\nscript = "{tmp_path / "raises.py"}"\n')
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(tmp_path / "raises.toml"), "--", "true"),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not load: ModuleNotFoundError: No module named 'no_such_module_for_this_test'" in proc.stderr


def answers_toml(banner: str, address: str) -> str:
    return (f'[[custom]]\nname = "banner"\nprotocol = "tcp"\nports = [4444]\nstatic = "{banner}"\n'
            f'[dns]\none_address = "{address}"\n')


def test_sighup_reads_the_answer_sections_again_and_a_bad_file_changes_nothing(tmp_path):
    import netns as netns_mod

    host = harness.build_local_host(netns_mod)
    div = None
    try:
        div = harness.Diverter(host, tmp_path, harness.config_text(mode="local") + answers_toml("one", "198.51.100.1"),
                           name="local").start()
        assert harness.run_client(host, "tcp", "198.51.100.9", "4444", "hi")["reply"] == "one"
        div.config_path.write_text(harness.config_text(mode="local") + answers_toml("two", "198.51.100.2"))
        asked = harness.nftdivert(host, "reload")  # the command sends the run its SIGHUP
        assert f"(pid {div.proc.pid})" in asked.stdout, asked
        div.wait_log(lambda r: r.get("event") == "reload", what="the reload record")
        assert harness.run_client(host, "tcp", "198.51.100.9", "4444", "hi")["reply"] == "two"
        div.config_path.write_text(answers_toml("three", "not an address"))
        div.proc.send_signal(signal.SIGHUP)
        refused = div.wait_log(lambda r: r.get("event") == "reload" and "error" in r, what="the refused reload")
        assert "dns.one_address" in refused["error"] and "reload refused" in div.stderr()
        assert harness.run_client(host, "tcp", "198.51.100.9", "4444", "hi")["reply"] == "two"
        # A file that also changes what shapes the ruleset is refused whole, naming what changed.
        div.config_path.write_text(harness.config_text(mode="local").replace("tcp_ports = []", "tcp_ports = [22]")
                                   + answers_toml("four", "198.51.100.4"))
        div.proc.send_signal(signal.SIGHUP)
        shaped = div.wait_log(lambda r: r.get("event") == "reload" and "leave_alone" in r.get("error", ""),
                              what="the reload refused for leave_alone")
        assert "restart" in shaped["error"], shaped
        assert harness.run_client(host, "tcp", "198.51.100.9", "4444", "hi")["reply"] == "two"
        div.stop_and_check()
        gone = harness.nftdivert(host, "reload", check=False)
        assert gone.returncode == 1 and gone.stderr.startswith("nftdivert: no nftdivert run owns table"), gone
    finally:
        if div is not None:
            div.kill()
        host.delete()
