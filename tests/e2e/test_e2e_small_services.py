"""The small services, TFTP, IRC and payloads by extension, end to end: real clients in `nftdivert sandbox`.

One sandbox runs every client, one after another, each to a name of its
own, as a sample would; each test then checks what its client got and that
the log names the answer with the destination and the name it asked for.
What the listener answers does not depend on the queue backend: any_backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import pytest

import harness
from conftest import REPO, nftdivert_argv
from filetypes import EXPECTED, file_type
from nftdivert.services import payloads

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend]

OFFSET = 86400  # [small_services] clock_offset: every clock a day ahead
EXTENSIONS = ("pdf", "jpg", "gif", "ico", "ps1", "js", "vbs", "bat", "doc", "docx", "xls", "xlsx", "elf", "sh",
              "apk", "jar", "msi")

# Raw-socket clients, as small as a sample's own: each writes what it got under $D.
CLIENTS = r'''
import json, os, socket, ssl, struct, time

def save(name, value):
    with open(name, "w") as out:
        json.dump(value, out)

def udp(name, port, data):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(data, (socket.gethostbyname(name), port))
        reply, peer = s.recvfrom(65535)
        return reply, peer, s.getsockname()[1]

def tcp(name, port, send=b"", keep=1 << 16):
    with socket.create_connection((name, port), timeout=10) as s:
        s.sendall(send)
        if send:
            s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < keep and (more := s.recv(65536)):
            got += more
        return got, s.getsockname()[1]

# SNTP (RFC 4330): version 4, mode 3, our transmit time; the answer must carry it back as its originate time.
sent = time.time()
mine = struct.pack("!Q", int((sent + 2208988800) * 2 ** 32))
reply, peer, port = udp("ntp.example", 123, b"\x23" + b"\0" * 39 + mine)
save("ntp.json", {"mode": reply[0] & 7, "version": (reply[0] >> 3) & 7, "stratum": reply[1],
                  "originate_ok": reply[24:32] == mine, "peer": list(peer), "port": port,
                  "offset": struct.unpack("!Q", reply[40:48])[0] / 2 ** 32 - 2208988800 - time.time()})

reply, peer, port = udp("time-udp.example", 37, b"")
save("time_udp.json", {"offset": struct.unpack("!I", reply)[0] - 2208988800 - time.time(), "port": port})
got, port = tcp("time-tcp.example", 37)
save("time_tcp.json", {"offset": struct.unpack("!I", got)[0] - 2208988800 - time.time(), "port": port})
save("daytime_udp.json", {"text": udp("daytime-udp.example", 13, b"\n")[0].decode()})
save("daytime_tcp.json", {"text": tcp("daytime-tcp.example", 13)[0].decode()})
save("qotd.json", {"udp": udp("qotd-udp.example", 17, b"")[0].decode(), "tcp": tcp("qotd-tcp.example", 17)[0].decode()})
save("chargen.json", {"udp": len(udp("chargen-udp.example", 19, b"")[0]),
                      "tcp": tcp("chargen-tcp.example", 19, keep=100000)[0][:148].decode()})
save("echo.json", {"tcp": tcp("echo-tcp.example", 7, b"ping 7")[0].decode(),
                   "udp": udp("echo-udp.example", 7, b"ping udp 7")[0].decode()})
got, port = tcp("discard.example", 9, b"x" * 10000)
save("discard.json", {"got": len(got), "port": port})
save("finger.json", {"text": tcp("finger.example", 79, b"admin\r\n")[0].decode()})
save("ident.json", {"text": tcp("ident.example", 113, b"6193, 23\r\n")[0].decode()})

def irc(sock, name):
    lines = []
    def until(word):
        buf = b""
        while not any(word in line for line in lines):
            more = sock.recv(4096)
            if not more:
                raise EOFError(word)
            buf += more
            *done, buf = buf.split(b"\r\n")
            lines.extend(line.decode() for line in done)
    sock.sendall(b"CAP LS 302\r\nPASS s3cret\r\nNICK " + name.encode() + b"\r\nUSER bot 0 * :Bot Real\r\nCAP END\r\n")
    until(" 376 ")
    sock.sendall(b"PING :cookie42\r\nJOIN #orders k3y\r\nPRIVMSG #orders :bot ready\r\n")
    until(" 366 ")
    until("cookie42")
    sock.sendall(b"QUIT :done\r\n")
    until("ERROR")
    return lines

with socket.create_connection(("irc.example", 6667), timeout=10) as s:
    save("irc.json", irc(s, "bot6667"))
with socket.create_connection(("irc-other.example", 7000), timeout=10) as s:
    save("irc_other.json", irc(s, "bot7000"))
ctx = ssl.create_default_context()
with socket.create_connection(("ircs.example", 6697), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="ircs.example") as s:
        save("ircs.json", irc(s, "bot6697"))
'''

SCRIPT = r"""
cd "$D"
python3 clients.py 2> clients.err; echo $? > clients.rc
ntpdate -q ntpdate.example > ntpdate.txt 2> ntpdate.err; echo $? > ntpdate.rc
rdate -p rdate.example > rdate_tcp.txt 2> rdate_tcp.err; echo $? > rdate_tcp.rc
rdate -p -u rdate-udp.example > rdate_udp.txt 2> rdate_udp.err; echo $? > rdate_udp.rc
logger -n syslog.example -P 514 -d "sample says hello"; echo $? > logger.rc
curl -sS --max-time 20 -o tftp.pdf tftp://tftp.example/boot/stage.pdf; echo $? > tftp_get.rc
curl -sS --max-time 20 -o tftp.bin tftp://tftp.example/mips; echo $? > tftp_bin.rc
head -c 5000 /dev/urandom > upload.bin
curl -sS --max-time 20 -T upload.bin tftp://tftp.example/loot.bin; echo $? > tftp_put.rc
busybox tftp -g -r bins/x86 -l busybox.bin tftp-busybox.example 2> busybox.err; echo $? > tftp_busybox.rc
printf 'one\ntwo\n' > notes.txt
tftp tftp-hpa.example -c get stage.sh hpa.sh 2> hpa.err; echo $? > tftp_hpa_get.rc
tftp tftp-hpa.example -c put notes.txt 2> hpa.err; echo $? > tftp_hpa_put.rc
for ext in $EXTENSIONS; do
    wget -q -T 20 -O "payload.$ext" "http://dl.example/files/stage.$ext"; echo $? > "wget_$ext.rc"
done
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("small")
    os.chmod(work, 0o777)
    (work / "clients.py").write_text(CLIENTS)
    config = work / "sandbox.toml"
    config.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n'
                      f'[tls]\nstate_dir = "{work / "state"}"\n[server_first]\nuploads_dir = "{work / "uploads"}"\n'
                      f'[small_services]\nclock_offset = {OFFSET}\n')
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work), EXTENSIONS=" ".join(EXTENSIONS))
    env.pop("SUDO_UID", None)
    proc = subprocess.run(nftdivert_argv("sandbox", "-c", str(config), "--timeout", "150", "--", "sh", "-c", SCRIPT),
                          capture_output=True, text=True, env=env, timeout=200)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (work / "clients.rc").read_text().strip() == "0", (work / "clients.err").read_text()
    return work, records


def got(work, name: str):
    return json.loads((work / name).read_text())


def rc(work, name: str) -> int:
    return int((work / f"{name}.rc").read_text())


def logged(records, event: str, name: str, port: int) -> list[dict]:
    """The service's records for the conversation to `name` on `port`, each with the start record's destination."""
    found = [r for r in records if r.get("event") == event and r.get("name") == name]
    assert found, f"no {event} record for {name}: {[r for r in records if r.get('event') == event]}"
    # A client port may start a TCP and a UDP conversation (two port spaces): every start it made.
    starts: dict[str, list[dict]] = {}
    for r in records:
        if r.get("event") == "start":
            starts.setdefault(r["client"], []).append(r)
    for rec in found:
        assert rec["original_destination"].endswith(f":{port}"), rec
        made = starts.get(rec["client"], [])
        assert rec["original_destination"] in [s["original_destination"] for s in made], (rec, made)
    return found


def test_ntp_gets_a_server_answer_with_the_configured_time(run):
    work, records = run
    ntp = got(work, "ntp.json")
    assert (ntp["mode"], ntp["version"]) == (4, 4) and 1 <= ntp["stratum"] <= 15 and ntp["originate_ok"]
    assert ntp["peer"][1] == 123  # from the port asked for
    assert abs(ntp["offset"] - OFFSET) < 5
    rec = logged(records, "ntp", "ntp.example", 123)[0]
    assert rec["answered"] and rec["mode"] == 3 and abs(rec["client_time"] - time.time()) < 300


def ntpdate_offsets(out: str) -> list[float]:
    """The offsets ntpdate measured: the round trip makes each a little off the configured one
    ("2026-12-07 04:23:57.374126 (+0000) +86399.999871 +/- 0.003667 ntpdate.example 198.18.0.4 s1 no-leap")."""
    return [float(word) for word in out.split() if word.startswith("+8")]


def test_ntpdate_sees_a_synchronised_server_a_day_ahead(run):
    work, records = run
    out = (work / "ntpdate.txt").read_text()
    assert rc(work, "ntpdate") == 0, out
    offsets = ntpdate_offsets(out)
    assert offsets and all(abs(o - OFFSET) < 5 for o in offsets) and " s1 " in out, out
    logged(records, "ntp", "ntpdate.example", 123)


def test_rdate_over_tcp_and_udp_reads_tomorrow(run):
    work, records = run
    tomorrow = time.strftime("%b %e", time.gmtime(time.time() + OFFSET))
    for name, host in (("rdate_tcp", "rdate.example"), ("rdate_udp", "rdate-udp.example")):
        out = (work / f"{name}.txt").read_text()
        assert rc(work, name) == 0 and tomorrow in out, out
        logged(records, "time", host, 37)


def test_time_over_udp_and_tcp_is_rfc_868_seconds(run):
    work, records = run
    assert abs(got(work, "time_udp.json")["offset"] - OFFSET) < 5
    assert abs(got(work, "time_tcp.json")["offset"] - OFFSET) < 5
    logged(records, "time", "time-udp.example", 37)
    logged(records, "time", "time-tcp.example", 37)


def test_daytime_tells_tomorrow(run):
    work, records = run
    tomorrow = time.strftime("%B %d, %Y", time.gmtime(time.time() + OFFSET))
    assert tomorrow in got(work, "daytime_udp.json")["text"]
    assert tomorrow in got(work, "daytime_tcp.json")["text"] and got(work, "daytime_tcp.json")["text"].endswith("\r\n")
    logged(records, "daytime", "daytime-udp.example", 13)
    logged(records, "daytime", "daytime-tcp.example", 13)


def test_qotd_chargen_echo_and_discard(run):
    work, records = run
    quotes = got(work, "qotd.json")
    assert all(0 < len(q) < 512 and q.endswith("\r\n") for q in quotes.values())
    chargen = got(work, "chargen.json")
    assert 0 < chargen["udp"] <= 512
    lines = chargen["tcp"].split("\r\n")
    assert len(lines[0]) == 72 and lines[1] == lines[0][1:] + chr(ord(lines[0][-1]) + 1)  # the rotating pattern
    assert got(work, "echo.json") == {"tcp": "ping 7", "udp": "ping udp 7"}
    assert got(work, "discard.json")["got"] == 0
    logged(records, "qotd", "qotd-udp.example", 17)
    logged(records, "qotd", "qotd-tcp.example", 17)
    logged(records, "chargen", "chargen-tcp.example", 19)
    rec = logged(records, "discard", "discard.example", 9)[0]
    assert rec["size"] == 10000 and rec["sha256"] == hashlib.sha256(b"x" * 10000).hexdigest()


def test_finger_and_ident_answer_the_query_and_log_it(run):
    work, records = run
    assert "Login: admin" in got(work, "finger.json")["text"]
    assert got(work, "ident.json")["text"] == "6193, 23 : USERID : UNIX : user\r\n"
    assert logged(records, "finger", "finger.example", 79)[0]["query"] == "admin"
    assert logged(records, "ident", "ident.example", 113)[0]["query"] == "6193, 23"


def test_syslog_messages_are_logged(run):
    work, records = run
    assert rc(work, "logger") == 0
    rec = logged(records, "syslog", "syslog.example", 514)[0]
    assert rec["message"].endswith("sample says hello") and rec["severity"] == "notice" and rec["facility"] == 1


def test_tftp_get_serves_by_extension_and_put_is_kept(run):
    work, records = run
    assert rc(work, "tftp_get") == 0 and (work / "tftp.pdf").read_bytes().startswith(b"%PDF-")
    assert rc(work, "tftp_bin") == 0 and (work / "tftp.bin").read_bytes()[:4] == b"\x7fELF"
    reads = logged(records, "tftp", "tftp.example", 69)
    assert {r["file"] for r in reads if r["operation"] == "read"} == {"boot/stage.pdf", "mips"}
    assert rc(work, "tftp_put") == 0
    upload = (work / "upload.bin").read_bytes()
    write = [r for r in reads if r["operation"] == "write"]
    assert len(write) == 1 and write[0]["file"] == "loot.bin" and write[0]["size"] == 5000
    assert write[0]["sha256"] == hashlib.sha256(upload).hexdigest()
    assert (work / "uploads" / write[0]["sha256"]).read_bytes() == upload


def test_tftp_clients_of_droppers_and_netascii_get_and_put_whole_files(run):
    work, records = run
    # busybox's client is the one IoT droppers carry; tftp-hpa speaks netascii by default.
    assert rc(work, "tftp_busybox") == 0 and (work / "busybox.bin").read_bytes() == payloads.by_extension("elf")[1]
    assert rc(work, "tftp_hpa_get") == 0 and (work / "hpa.sh").read_bytes() == payloads.by_extension("sh")[1]
    assert rc(work, "tftp_hpa_put") == 0
    logged(records, "tftp", "tftp-busybox.example", 69)
    # By operation, not order: two transfers, possibly in two listener processes.
    hpa = sorted(logged(records, "tftp", "tftp-hpa.example", 69), key=lambda r: r["operation"])
    assert [(r["operation"], r["mode"]) for r in hpa] == [("read", "netascii"), ("write", "netascii")]
    assert hpa[1]["sha256"] == hashlib.sha256(b"one\ntwo\n").hexdigest()


@pytest.mark.parametrize("reply, name, port", [("irc.json", "irc.example", 6667),
                                               ("irc_other.json", "irc-other.example", 7000),
                                               ("ircs.json", "ircs.example", 6697)])
def test_an_irc_bot_registers_joins_and_talks(run, reply, name, port):
    work, records = run
    lines = got(work, reply)
    nick = f"bot{port}"
    codes = [line.split()[1] for line in lines if line.startswith(":")]
    assert [c for c in codes if c in ("001", "002", "003", "004", "005", "376")] == \
        ["001", "002", "003", "004", "005", "376"]
    assert any(line.startswith(f":{nick}!") and line.endswith("JOIN #orders") for line in lines)
    assert any(" PONG " in line and line.endswith(":cookie42") for line in lines)
    recs = logged(records, "irc", name, port)
    assert [r["command"] for r in recs] == ["register", "JOIN", "PRIVMSG", "QUIT"]
    assert recs[0]["nick"] == nick and recs[0]["password"] == "s3cret" and recs[0]["realname"] == "Bot Real"
    assert recs[1]["channel"] == "#orders" and recs[1]["key"] == "k3y"
    assert recs[2]["target"] == "#orders" and recs[2]["text"] == "bot ready"


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_wget_of_each_extension_gets_a_file_of_that_type(run, ext):
    work, records = run
    assert rc(work, f"wget_{ext}") == 0
    assert EXPECTED[ext] in file_type(work / f"payload.{ext}")
    assert (work / f"payload.{ext}").read_bytes() == payloads.by_extension(ext)[1]  # vbs: file(1) only says text
    req = [r for r in records if r.get("event") == "http" and r.get("url") == f"http://dl.example/files/stage.{ext}"]
    assert req and req[0]["status"] == 200 and req[0]["original_destination"].endswith(":80")
