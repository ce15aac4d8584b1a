"""C2 transports end to end: proxies, WebSocket, DNS over HTTPS, HTTP/2, with real clients in `nftdivert sandbox`.

One sandbox runs every client one after another; each test checks what its
client got and that the log names what it asked for, with the
conversation's original destination. The sandbox trusts our CA, so curl's
HTTPS inside a proxy's tunnel verifies a leaf made for the target's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

import harness
from conftest import REPO, nftdivert_argv

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

RULES = """
[[http.rules]]
host = "tasks.example"
path = "/ws"
body = "run calc.exe"
"""

# $D is the work directory, $PY a Python with wsproto; every client's result lands in $D.
SCRIPT = r"""
cd "$D"
curl -sS --max-time 20 -o connect.txt -x http://198.51.100.88:3128 https://proxied.example/stage.txt; echo $? > connect.rc
curl -sS --max-time 20 -o socks5.txt --socks5-hostname 198.51.100.89:1080 --proxy-user bot:hunter2 https://socks5.example/s5.json
echo $? > socks5.rc
curl -sS --max-time 20 -o socks4a.txt --socks4a 198.51.100.90:1080 https://socks4a.example/s4.txt; echo $? > socks4a.rc
curl -sS --max-time 20 -o socks4.txt --socks4 198.51.100.91:1080 http://192.0.2.44/s4plain.txt; echo $? > socks4.rc
curl -sS --max-time 20 -o h2.txt --http2 -w '%{http_version}' https://h2.example/h2.txt > h2.version; echo $? > h2.rc
curl -sS --max-time 20 -o h2c.txt --http2-prior-knowledge -w '%{http_version}' http://h2c.example/h2c.txt > h2c.version
echo $? > h2c.rc
curl -sS --max-time 20 -o upgrade.txt --http2 -w '%{http_version}' http://upgrade.example/u.txt > upgrade.version
echo $? > upgrade.rc
curl -sS --max-time 20 -o doh.txt --doh-url https://dns.example/dns-query http://doh-only.example/doh.txt; echo $? > doh.rc
curl -sS --max-time 20 -o doh.json -H 'Accept: application/dns-json' \
    'https://cloudflare-dns.com/dns-query?name=json-only.example&type=A'; echo $? > doh_json.rc
"$PY" -c '
import json, socket
from wsproto import WSConnection, ConnectionType
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

def talk(host, path, messages):
    s = socket.create_connection((host, 80), timeout=10)
    ws = WSConnection(ConnectionType.CLIENT)
    s.sendall(ws.send(Request(host=host, target=path)))
    got, accepted = [], False
    while len(got) < len(messages):
        data = s.recv(65536)
        if not data:
            break
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):  # then the messages, all at once
                accepted = True
                s.sendall(b"".join(ws.send(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m))
                                   for m in messages))
            if isinstance(event, (TextMessage, BytesMessage)):
                got.append(event.data if isinstance(event.data, str) else event.data.hex())
    if accepted:
        s.sendall(ws.send(CloseConnection(code=1000)))
    s.close()
    return {"accepted": accepted, "got": got}

out = {"echo": talk("ws.example", "/gate", ["beacon 1", bytes(range(100))]),
       "rule": talk("tasks.example", "/ws", ["ready"])}
open("ws.json", "w").write(json.dumps(out))
' 2> ws.err; echo $? > ws.rc
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("c2")
    os.chmod(work, 0o755)
    config = work / "sandbox.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n[tls]\n'
                      f'state_dir = "{work / "state"}"\n[http]\nbodies_dir = ""\n' + RULES)
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work), PY=sys.executable)
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--timeout", "120", "--", "sh", "-c", SCRIPT),
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return work, records


def rc(work, name: str) -> int:
    return int((work / f"{name}.rc").read_text())


def one(records, **fields) -> dict:
    found = [r for r in records if all(r.get(k) == v for k, v in fields.items())]
    assert found, f"nothing logged with {fields}: {records}"
    return found[0]


def test_http_connect_tunnels_https_to_a_leaf_for_the_target_and_logs_it(run):
    work, records = run
    assert rc(work, "connect") == 0 and (work / "connect.txt").read_bytes() == b"ok\n"
    connect = one(records, event="http", method="CONNECT")
    assert connect["url"] == "proxied.example:443" and connect["tunnel"] == "proxied.example:443"
    assert connect["original_destination"] == "198.51.100.88:3128" and connect["status"] == 200
    # Inside the tunnel: TLS for the name asked for, then the request, each with the proxy's destination.
    hello = one(records, event="tls", sni="proxied.example")
    assert hello["result"] == "ok" and hello["tunnel"] == "proxied.example:443"
    req = one(records, event="http", url="https://proxied.example/stage.txt")
    assert req["client"] == connect["client"] and req["original_destination"] == "198.51.100.88:3128"


@pytest.mark.parametrize("name, kind, proxy, url, body", [
    ("socks5", "socks5", "198.51.100.89:1080", "https://socks5.example/s5.json", b"{}\n"),
    ("socks4a", "socks4a", "198.51.100.90:1080", "https://socks4a.example/s4.txt", b"ok\n"),
    ("socks4", "socks4", "198.51.100.91:1080", "http://192.0.2.44/s4plain.txt", b"ok\n"),
])
def test_socks_proxies_tunnel_into_our_answers_and_log_the_target(run, name, kind, proxy, url, body):
    work, records = run
    assert rc(work, name) == 0 and (work / f"{name}.txt").read_bytes() == body
    target = url.split("/")[2] + (":443" if url.startswith("https") else ":80")
    rec = one(records, event="proxy", kind=kind)
    assert rec["target"] == target and rec["command"] == "connect" and rec["original_destination"] == proxy
    if kind == "socks5":  # curl gives the proxy's username and password when it has them
        assert (rec["user"], rec["password"]) == ("bot", "hunter2")
    req = one(records, event="http", url=url)
    assert req["tunnel"] == target and req["original_destination"] == proxy and req["client"] == rec["client"]


def spoke_http2(work, name: str) -> None:
    """curl said HTTP/2 (-w %{http_version}) and got the file asked for."""
    assert rc(work, name) == 0 and (work / f"{name}.version").read_text() == "2"
    assert (work / f"{name}.txt").read_bytes() == b"ok\n"


def test_curl_http2_over_tls_negotiates_h2_and_is_logged_as_http2(run):
    work, records = run
    spoke_http2(work, "h2")
    assert one(records, event="tls", sni="h2.example")["alpn"] == "h2"
    req = one(records, event="http", url="https://h2.example/h2.txt")
    assert req["http_version"] == "2" and req["method"] == "GET" and req["status"] == 200
    assert [":authority", "h2.example"] in req["headers"]
    assert req["original_destination"].endswith(":443") and req["name"] == "h2.example"
    # curl ends HTTP/2 connections itself: nothing of ours (a late close_notify) makes it reset them.
    assert one(records, event="end", client=req["client"])["ended"] == "closed"


def test_h2c_prior_knowledge_is_answered_and_logged(run):
    work, records = run
    spoke_http2(work, "h2c")
    req = one(records, event="http", url="http://h2c.example/h2c.txt")
    assert req["http_version"] == "2" and req["original_destination"].endswith(":80") and req["name"] == "h2c.example"


def test_curl_http2_on_plain_http_upgrades_to_h2c(run):
    work, records = run
    spoke_http2(work, "upgrade")
    req = one(records, event="http", url="http://upgrade.example/u.txt")
    assert req["upgrade"] == "h2c" and req["original_destination"].endswith(":80") and req["name"] == "upgrade.example"


def test_dns_over_https_resolves_into_the_pool_and_is_logged_as_dns(run):
    work, records = run
    assert rc(work, "doh") == 0 and (work / "doh.txt").read_bytes() == b"ok\n"
    doh = [r for r in records if r.get("event") == "http" and r.get("url") == "https://dns.example/dns-query"]
    assert doh and all(r["doh"] is True and r["status"] == 200 for r in doh)
    assert doh[0]["name"] == "dns.example" and doh[0]["original_destination"].endswith(":443")
    # The question came over the DoH connection (its client), not to port 53.
    asked = [r for r in records if r.get("event") == "dns" and r["name"] == "doh-only.example"]
    assert asked and {r["client"] for r in asked} <= {r["client"] for r in doh}, (asked, doh)
    answer = next(r["answer"] for r in asked if r["type"] == "A")
    req = one(records, event="http", url="http://doh-only.example/doh.txt")
    assert req["original_destination"] == f"{answer}:80" and req["name"] == "doh-only.example"


def test_json_dns_over_https_answers_from_the_pool(run):
    work, records = run
    assert rc(work, "doh_json") == 0
    (answer,) = json.loads((work / "doh.json").read_text())["Answer"]
    asked = one(records, event="dns", name="json-only.example")
    assert asked["answer"] == answer["data"] and answer["data"].startswith("198.18.")
    req = one(records, event="http", url="https://cloudflare-dns.com/dns-query?name=json-only.example&type=A")
    assert req["doh"] is True and req["client"] == asked["client"] and req["name"] == "cloudflare-dns.com"


def test_websocket_gets_101_and_its_messages_are_echoed_or_answered_by_rule_and_logged(run):
    work, records = run
    assert rc(work, "ws") == 0, (work / "ws.err").read_text()
    got = json.loads((work / "ws.json").read_text())
    assert got["echo"] == {"accepted": True, "got": ["beacon 1", bytes(range(100)).hex()]}
    assert got["rule"] == {"accepted": True, "got": ["run calc.exe"]}
    upgrade = one(records, event="http", url="ws://ws.example/gate")
    assert upgrade["status"] == 101 and upgrade["original_destination"].endswith(":80")
    frames = [r for r in records if r.get("event") == "websocket" and r["client"] == upgrade["client"]]
    assert [(f["opcode"], f["size"], f["answered"]) for f in frames] == [("text", 8, "echo"), ("binary", 100, "echo")]
    assert frames[1]["sha256"] == hashlib.sha256(bytes(range(100))).hexdigest()
    assert frames[1]["head"] == bytes(range(64)).hex() and frames[0]["name"] == "ws.example"
    assert one(records, event="websocket", answered="rule")["original_destination"].endswith(":80")
