"""End to end: records shipped to a real rsyslog, from two gateways.

rsyslog runs as a process of its own in a namespace of its own (a config
generated here: imtcp, one line per message in a file: the APP-NAME, then
the JSON record), linked to two local-mode hosts, each running `nftdivert
run` with `[syslog]` pointing at it (the collector's addresses are left
alone, or local mode would divert the sender's own connection). Gateway A
keeps our field names and a small buffer; gateway B writes Elastic Common
Schema names. What rsyslog wrote must equal each log, record for record;
while rsyslog is stopped, records within the buffer wait and arrive once it
is back, and what exceeds the buffer is counted as dropped, so that the
log's records = what rsyslog got + dropped, exactly. And the Community ID
of a logged conversation is what the `communityid` package computes from
the packets the run's own capture holds.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import communityid
import pytest

import harness
import netns

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="needs rsyslogd (rsyslog, see the Makefile)")]

PORT = 6514
BUFFER = 20  # gateway A's: small, so one burst exceeds it
A_LINK, B_LINK = ("203.0.113.1/30", "203.0.113.2/30"), ("203.0.113.5/30", "203.0.113.6/30")
# Gateway A's: the defaults, and the DNS listener (its questions' records take their conversation's ID).
LISTENERS = harness.ECHO_LISTENERS + harness.DNS_LISTENER
RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k"{tls_files})
module(load="imtcp"{tls_input})
template(name="each" type="string" string="%app-name% %msg%\\n")
ruleset(name="remote") {{
  action(type="omfile" file="{out}" template="each")
}}
input(type="imtcp" port="{port}" ruleset="remote")
"""


class Rsyslog:
    """rsyslogd -n in its namespace; stop() waits until it has exited (its file then holds all it got)."""

    def __init__(self, ns, work, tls: dict[str, str] | None = None) -> None:
        self.ns, self.out, self.conf = ns, work / "collected.log", work / "rsyslog.conf"
        (work / "spool").mkdir()
        # TLS (rsyslog-gnutls): its certificate, and a client's signed by the same CA required.
        files = "".join(f' DefaultNetstreamDriver{k}File="{v}"' for k, v in (tls or {}).items())
        driver = ' StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid"'
        self.conf.write_text(RSYSLOG_CONF.format(work=work / "spool", out=self.out, port=PORT, tls_files=files,
                                                 tls_input=driver if tls else ""))
        self.pidfile, self.err = work / "rsyslogd.pid", work / "rsyslogd.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Rsyslog":
        with open(self.err, "a") as err:
            self.proc = self.ns.popen("rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.pidfile),
                                      stdout=err, stderr=err)
        harness.wait_for(lambda: harness.port_bound(self.ns, "tcp", PORT) or self.proc.poll() is not None, 20,
                         "rsyslogd to listen", detail=self.err.read_text)
        assert self.proc.poll() is None, self.err.read_text()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def records(self, app: str) -> list[dict]:
        try:
            lines = self.out.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith(f"{app} ")]


def _talk(host, first: int, n: int) -> None:
    """n TCP conversations to the echo, each to an address of its own (198.51.100.x:4444)."""
    script = "; ".join(f"echo s{i} | nc -q1 -w5 198.51.100.{i} 4444" for i in range(first, first + n))
    host.run("sh", "-c", script, timeout=30 + 5 * n)


def _shipped(div) -> dict[str, int]:
    """The running gateway's syslog counters, as `nftdivert status` shows them."""
    out = harness.nftdivert(div.ns, "status").stdout
    found = re.search(r"syslog records sent (\d+), buffered (\d+), dropped (\d+)", out)
    assert found, out
    return dict(zip(("sent", "buffered", "dropped"), map(int, found.groups())))


@contextmanager
def _lab(work, links, tls: dict[str, str] | None = None):
    """(the gateways' hosts, rsyslog started, the gateways' Diverters to kill at the end): all gone after."""
    collector = netns.create("collector")
    hosts, divs, rsyslog = [], [], None
    try:
        harness.quiet(collector)
        for name, (ours, theirs) in links:
            host = harness.build_local_host(netns)
            hosts.append(host)
            netns.link(host, "to-coll", [ours], collector, f"gw-{name}", [theirs])
        rsyslog = Rsyslog(collector, work, tls).start()
        yield hosts, rsyslog, divs
    finally:
        for div in divs:
            div.kill()
        if rsyslog is not None:
            rsyslog.stop()
        for ns in [*hosts, collector]:
            ns.delete()


def _gateway(host, work, name: str, syslog: str, worker: str = "", more: str = "",
             run: str = "") -> harness.Diverter:
    config = (harness.config_text(mode="local", hosts=["203.0.113.0/24"]) + f"\n[worker]\n{worker}\n"
              + f'[syslog]\naddress = "{syslog}:{PORT}"\napp_name = "gw-{name}"\n{more}')
    return harness.Diverter(host, work, config, name=run or f"gw-{name}")  # its log: <run>.log.jsonl


def _adds_up(div, rsyslog, app: str) -> dict[str, int] | None:
    """The sender's counters once they account for every record logged, and rsyslog holds what it sent."""
    shipped = _shipped(div)
    if shipped["sent"] + shipped["buffered"] + shipped["dropped"] != len(div.log()):
        return None
    return shipped if len(rsyslog.records(app)) == shipped["sent"] else None


def _final(div) -> dict[str, int]:
    found = re.findall(r"syslog records sent (\d+), buffered (\d+), dropped (\d+)", div.stderr())
    assert found, div.stderr()
    return dict(zip(("sent", "buffered", "dropped"), map(int, found[-1])))


@pytest.fixture
def lab(tmp_path):
    with _lab(tmp_path, (("a", A_LINK), ("b", B_LINK))) as (hosts, rsyslog, divs):
        yield hosts, rsyslog, tmp_path, divs


def test_two_gateways_ship_every_record_and_count_what_a_stopped_collector_missed(lab):
    (host_a, host_b), rsyslog, work, divs = lab
    pcap = work / "gw-a.pcap"
    div_a = _gateway(host_a, work, "a", "203.0.113.2", f'pcap = "{pcap}"', f"buffer = {BUFFER}\n" + LISTENERS)
    div_b = _gateway(host_b, work, "b", "203.0.113.6", 'log_schema = "ecs"')
    divs += [div_a, div_b]
    div_a.start()
    div_b.start()

    # Both up: every record reaches rsyslog.
    _talk(host_a, 10, 3)
    _talk(host_b, 10, 3)
    host_a.run("ping", "-c1", "-W5", "198.51.100.99", timeout=10)
    host_a.run("curl", "-sS", "-o", "/dev/null", "--max-time", "10", "http://198.51.100.80/flow", timeout=20)
    host_a.run("dig", "+tries=1", "+time=5", "@198.51.100.53", "flow.example", timeout=20)
    harness.wait_for(lambda: len(rsyslog.records("gw-a")) == len(div_a.log()) >= 8
                     and len(rsyslog.records("gw-b")) == len(div_b.log()) >= 3, 20, "rsyslog to have both logs",
                     detail=lambda: f"a {len(div_a.log())} b {len(div_b.log())} rsyslog {rsyslog.out.read_text()}")

    # rsyslog away, fewer records than the buffer: they wait, and arrive once it is back.
    rsyslog.stop()
    _talk(host_a, 20, 5)
    _talk(host_b, 20, 5)
    for div, app in ((div_a, "gw-a"), (div_b, "gw-b")):
        held = harness.wait_for(lambda: _adds_up(div, rsyslog, app), 20, f"{app}'s sender to hold the new starts")
        assert held["buffered"] >= 5 and held["dropped"] == 0, held
    rsyslog.start()
    for div, app in ((div_a, "gw-a"), (div_b, "gw-b")):
        back = harness.wait_for(lambda: (c := _adds_up(div, rsyslog, app)) and c["buffered"] == 0 and c, 20,
                                f"{app}'s buffered records after the restart")
        assert back["dropped"] == 0, back  # nothing lost within the buffer bound

    # rsyslog away, more records than gateway A's buffer: the excess is dropped, counted.
    rsyslog.stop()
    _talk(host_a, 30, BUFFER + 7)
    full = harness.wait_for(lambda: (c := _adds_up(div_a, rsyslog, "gw-a")) and c["buffered"] == BUFFER and c, 30,
                            "gateway A's buffer to fill")
    assert full["dropped"] >= 7, full
    rsyslog.start()
    harness.wait_for(lambda: (c := _adds_up(div_a, rsyslog, "gw-a")) and c["buffered"] == 0, 20,
                     "gateway A to catch up")

    div_a.stop_and_check()  # the ends of every conversation still tracked, written and shipped at the stop
    div_b.stop_and_check()
    rsyslog.stop()  # everything it got is in its file now
    for div, app in ((div_a, "gw-a"), (div_b, "gw-b")):
        logged, collected, final = div.log(), rsyslog.records(app), _final(div)
        assert final["buffered"] == 0
        assert final["sent"] == len(collected), (app, final, len(collected))
        assert final["sent"] + final["dropped"] == len(logged), (app, final, len(logged))
        assert Counter(map(json.dumps, collected)) <= Counter(map(json.dumps, logged))  # each as logged, once
        print(f"\n{app}: logged {len(logged)}, rsyslog wrote {len(collected)}, exit counters {final}")
    assert _final(div_a)["dropped"] >= 7 and _final(div_b)["dropped"] == 0
    assert rsyslog.records("gw-b") == div_b.log()  # nothing lost: record for record, in order
    assert all(r["network"]["community_id"].startswith("1:")
               for r in div_b.log() if r["event"]["action"] in ("start", "end"))  # ECS names

    # The Community ID of each logged conversation is the one of the pcap's packets.
    firsts, pings = _first_packets(pcap)
    conversations = [r for r in div_a.log() if r["event"] == "start"]
    assert len(conversations) == 3 + 1 + 1 + 1 + 5 + BUFFER + 7
    for event in ("http", "dns"):  # a listener's records: their conversation's ID
        said = next(r for r in div_a.log() if r["event"] == event)
        assert said["community_id"] == next(r["community_id"] for r in conversations if r["client"] == said["client"])
    reference = communityid.CommunityID(seed=0)
    for rec in conversations:
        if rec["protocol"] == "icmp":
            assert pings == [(rec["client"], rec["original_destination"])]
            flow = communityid.FlowTuple.make_icmp(*pings[0], 8, 0)
        else:
            # A client port may go to two destinations (the kernel's choice): the pair is the key.
            src, dst, sport, dport = firsts[rec["protocol"], rec["client"], rec["original_destination"]]
            flow = communityid.FlowTuple(communityid.PROTO_TCP if rec["protocol"] == "tcp" else communityid.PROTO_UDP,
                                         src, dst, sport, dport)
        assert rec["community_id"] == reference.calc(flow), rec


def _fields(pcap, display_filter: str, *fields: str) -> list[list[str]]:
    proc = subprocess.run(["tshark", "-r", str(pcap), "-Y", display_filter, "-T", "fields",
                           *(arg for f in fields for arg in ("-e", f))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines()]


def _first_packets(pcap) -> tuple[dict, list]:
    """As the capture holds them: the client's SYNs and its DNS questions by protocol, client and
    destination (address, destination, their ports), and its echo requests (address, destination)."""
    syns = _fields(pcap, "tcp.flags.syn == 1 && tcp.flags.ack == 0", "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport")
    questions = _fields(pcap, "udp.dstport == 53", "ip.src", "ip.dst", "udp.srcport", "udp.dstport")
    pings = _fields(pcap, "icmp.type == 8", "ip.src", "ip.dst")
    return ({(proto, f"{src}:{sport}", f"{dst}:{dport}"): (src, dst, int(sport), int(dport))
             for proto, rows in (("tcp", syns), ("udp", questions)) for src, dst, sport, dport in rows},
            [tuple(row) for row in pings])


def _authority(work, name: str):
    """A CA of its own: (its certificate's path, its key, its certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = _signed(x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True), key, hashes)
    path = work / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def _signed(builder, key, hashes):
    import datetime

    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))


def _leaf(work, authority, name: str, address: str | None = None) -> tuple[str, str]:
    """A certificate the authority signs (for `address` if given): (its path, its key's path)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    _path, ca_key, ca_cert = authority
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()))
    if address:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                                        critical=False)
    cert, key_path = work / f"{name}.pem", work / f"{name}.key"
    cert.write_bytes(_signed(builder, ca_key, hashes).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert), str(key_path)


@pytest.mark.skipif(not list(Path("/usr/lib").rglob("rsyslog/lmnsd_gtls.so")),
                    reason="needs rsyslog's TLS driver (rsyslog-gnutls, see the Makefile)")
def test_over_tls_rsyslog_gets_every_record_and_a_stranger_s_certificate_gets_none(tmp_path):
    authority = _authority(tmp_path, "lab-ca")
    server_cert, server_key = _leaf(tmp_path, authority, "collector", "203.0.113.2")
    client_cert, client_key = _leaf(tmp_path, authority, "gw-a")
    tls = {"CA": str(authority[0]), "Cert": server_cert, "Key": server_key}
    with _lab(tmp_path, (("a", A_LINK),), tls) as ((host,), rsyslog, divs):
        keys = (f'tls = true\nca_file = "{authority[0]}"\ncert_file = "{client_cert}"\n'
                f'key_file = "{client_key}"\n')
        div = _gateway(host, tmp_path, "a", "203.0.113.2", more=keys)
        divs.append(div)
        div.start()
        _talk(host, 10, 3)
        harness.wait_for(lambda: len(rsyslog.records("gw-a")) == len(div.log()) >= 3, 20,
                         "rsyslog to have the log over TLS", detail=rsyslog.err.read_text)
        div.stop_and_check()
        assert "over TLS" in div.stderr()
        final = _final(div)
        assert final["sent"] == len(div.log()) == len(rsyslog.records("gw-a")) and final["dropped"] == 0
        assert rsyslog.records("gw-a") == div.log()

        # The collector's certificate from another CA: refused, nothing sent, all counted as dropped.
        stranger = _authority(tmp_path, "stranger-ca")[0]
        had = len(rsyslog.records("gw-a"))
        div = _gateway(host, tmp_path, "a", "203.0.113.2", more=keys.replace(str(authority[0]), str(stranger)),
                       run="gw-a-stranger")
        divs.append(div)
        div.start()
        _talk(host, 20, 1)
        div.wait_log(lambda r: r.get("event") == "start", what="the start")
        div.stop_and_check()
        final = _final(div)
        assert final["sent"] == 0 and final["dropped"] == len(div.log()) >= 2, final
        assert "CERTIFICATE_VERIFY_FAILED" in div.stderr()
        assert len(rsyslog.records("gw-a")) == had
