"""Several listener processes end to end: real clients in `nftdivert sandbox` with
`listener_processes = 2`, so the kernel spreads their connections over two processes.

Names asked of the one DNS owner, connected to in either process, are logged with
their names; FTP data connections reach their session whichever process accepted
them; TFTP transfers (a conversation of datagrams) complete.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

import pytest

import harness

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

NAMES = 300  # resolved twice each
HTTP_NAMES = 60  # of them, fetched over a connection each
FTP_SESSIONS = 12  # each a control connection and a passive transfer; 4 more active

CLIENTS = r"""
import ftplib, io, json, socket, urllib.request

out = {}
addresses = {}
for round_ in range(2):
    for i in range(NAMES):
        name = f"host{i}.cores.example"
        address = [socket.getaddrinfo(name, 80, family)[0][4][0] for family in (socket.AF_INET, socket.AF_INET6)]
        if addresses.setdefault(name, address) != address:
            out.setdefault("moved", []).append([name, addresses[name], address])
out["addresses"] = addresses
out["http"] = []
for i in range(HTTP_NAMES):
    with urllib.request.urlopen(f"http://host{i}.cores.example/p{i}", timeout=15) as r:
        out["http"].append(r.status)

def passive(i):
    f = ftplib.FTP(f"ftp{i}.cores.example", timeout=15)
    f.login(f"user{i}", "pw")
    got = io.BytesIO()
    f.retrbinary(f"RETR f{i}.exe", got.write)
    f.storbinary(f"STOR up{i}.bin", io.BytesIO(b"u%d" % i * 1000))
    f.quit()
    return got.getvalue()[:2].decode("latin-1")

def active(i):
    f = ftplib.FTP(f"ftpa{i}.cores.example", timeout=15)
    f.login(f"active{i}", "pw")
    f.set_pasv(False)
    got = io.BytesIO()
    f.retrbinary(f"RETR a{i}.exe", got.write)
    f.quit()
    return got.getvalue()[:2].decode("latin-1")

for name, step, count in (("passive", passive, FTP_SESSIONS), ("active", active, 4)):
    out[name] = []
    for i in range(count):
        try:
            out[name].append(step(i))
        except Exception as exc:
            out[name].append(f"{type(exc).__name__}: {exc}")
json.dump(out, open("clients.json", "w"))
""".replace("HTTP_NAMES", str(HTTP_NAMES)).replace("NAMES", str(NAMES)).replace("FTP_SESSIONS", str(FTP_SESSIONS))

SCRIPT = r"""
cd "$D"
python3 clients.py 2> clients.err
for i in 1 2 3 4 5 6 7 8 9 10; do
  curl -sS --max-time 20 -o tftp$i.pdf tftp://tftp$i.cores.example/boot/s$i.pdf; echo $? > tftp$i.rc
done
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cores")
    os.chmod(work, 0o755)
    (work / "clients.py").write_text(CLIENTS)
    records = harness.sandbox_records(work, "listener_processes = 2\n",
                                  f'[tls]\nstate_dir = "{work / "state"}"\n[server_first]\n'
                                  f'mail_dir = "{work / "mail"}"\nuploads_dir = "{work / "uploads"}"\n',
                                  SCRIPT, timeout=200)
    assert (work / "clients.json").exists(), (work / "clients.err").read_text()
    return work, records, json.loads((work / "clients.json").read_text())


def test_each_name_keeps_one_address_and_the_log_names_every_request_right(run):
    _work, records, clients = run
    assert "moved" not in clients, clients["moved"]
    addresses = clients["addresses"]
    assert len(addresses) == NAMES and len({a for pair in addresses.values() for a in pair}) == 2 * NAMES
    assert clients["http"] == [200] * HTTP_NAMES
    requests = {urlsplit(r["url"]).hostname: r for r in records if r.get("event") == "http" and "cores" in r["url"]}
    assert len(requests) == HTTP_NAMES, requests
    for host, r in requests.items():
        v4, v6 = addresses[host]
        assert r["original_destination"] in (f"{v4}:80", f"[{v6}]:80") and r["name"] == host, r


def test_ftp_passive_and_active_transfers_reach_their_session_in_either_process(run):
    work, records, clients = run
    assert clients["passive"] == ["MZ"] * FTP_SESSIONS and clients["active"] == ["MZ"] * 4, clients
    uploads = [r for r in records if r.get("event") == "ftp_upload"]
    assert sorted(r["name"] for r in uploads) == sorted(f"up{i}.bin" for i in range(FTP_SESSIONS)), uploads


def test_tftp_transfers_complete(run):
    work, _records, _clients = run
    for i in range(1, 11):
        assert (work / f"tftp{i}.rc").read_text().strip() == "0"
        assert (work / f"tftp{i}.pdf").read_bytes().startswith(b"%PDF-")
