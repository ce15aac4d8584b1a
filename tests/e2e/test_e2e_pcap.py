"""The capture (-w) end to end: what the client sent and got, as it saw it.

The client's own link is captured at the same time (tcpdump on its eth0):
that is the truth. The diverter's pcap must hold exactly those packets,
each once, with the addresses and ports the client used, for every kind of
conversation nftdivert answers, and none of the traffic it leaves alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

import pytest

import harness

# The capture chains sit beside the queue, not in its path: the host tier proves them.
pytestmark = [pytest.mark.kernel, pytest.mark.any_backend,
              pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (bind9-dnsutils, see the Makefile)")]

BOUND_PORT = 8080  # a service of the diverter host's own
LEFT_ALONE_PORT = 9
SPOOFED = "203.0.113.99"  # a source the client does not own
LISTENERS = harness.ECHO_LISTENERS + harness.DNS_LISTENER + """
[[listeners]]
name = "dns-tcp"
protocol = "tcp"
port = 53
kind = "dns"
"""
# One row per packet: what the client and the capture must agree on.
FIELDS = ("ip.src", "ipv6.src", "ip.dst", "ipv6.dst", "tcp.srcport", "tcp.dstport", "tcp.flags", "tcp.seq_raw",
          "tcp.ack_raw", "udp.srcport", "udp.dstport", "icmp.type", "icmpv6.type", "ip.len", "ipv6.plen")
# Link housekeeping the client does on its own: router and neighbour discovery, MLD.
HOUSEKEEPING = {"130", "131", "132", "133", "134", "135", "136", "143"}


def packets(path) -> list[tuple[str, ...]]:
    proc = subprocess.run(["tshark", "-r", str(path), "-Y", "ip or ipv6", "-T", "fields", "-E", "separator=\t",
                           *(arg for f in FIELDS for arg in ("-e", f))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [tuple(line.split("\t")) for line in proc.stdout.splitlines()]
    return [r for r in rows if r[FIELDS.index("icmpv6.type")] not in HOUSEKEEPING
            and not (r[3] or "").startswith("ff")]  # nor IPv6 multicast


def far_end(row: tuple[str, ...]) -> tuple[str, str]:
    """The address and port (or "") on the far side of the client, whichever way the packet went."""
    src, dst = row[0] or row[1], row[2] or row[3]
    sport, dport = row[4] or row[9], row[5] or row[10]
    return (dst, dport) if src in (harness.CLIENT4, harness.CLIENT6) else (src, sport)


def test_the_pcap_holds_what_the_client_sent_and_got_each_packet_once(gw, tmp_path):
    gw.stop()
    pcap = tmp_path / "divert.pcap"
    config = (harness.config_text(tcp_ports=[LEFT_ALONE_PORT]) + LISTENERS
              + f'\n[worker]\npcap = "{pcap}"\n')
    own = harness.serve_tcp(gw.diverter_ns, BOUND_PORT, "own service")
    div = harness.Diverter(gw.diverter_ns, tmp_path, config, name="pcap")
    client_cap = harness.Capture(gw.client, "eth0", tmp_path / "client.pcap", "ip or ip6")
    try:
        div.start()
        client_cap.start()
        assert gw.tcp("198.51.100.7", 45678, "tcp to the default listener")["reply"] == "tcp to the default listener"
        assert gw.udp("198.51.100.8", 5353, "udp")["reply"] == "udp"
        assert gw.tcp("198.51.100.10", BOUND_PORT, "x")["reply"] == "own service"
        gw.client.run("ping", "-c2", "-i0.2", "-W5", "198.51.100.9", timeout=20)
        gw.client.run("ping", "-6", "-c2", "-i0.2", "-W5", "2001:db8:ffff::9", timeout=20)
        dig = gw.client.run("dig", "+tries=1", "+time=5", "+short", "@198.51.100.53", "a.example", timeout=20)
        assert dig.stdout.startswith("198.18."), dig.stdout
        dig = gw.client.run("dig", "+tcp", "+tries=1", "+time=5", "+short", "@2001:db8:ffff::53", "b.example",
                            "AAAA", timeout=20)
        assert dig.stdout.startswith("2001:db8:53:"), dig.stdout
        # From a source the client does not own: in the pcap as evidence, never answered.
        spoofed = [[SPOOFED, "198.51.100.12", "udp", 7, "EXFIL"]]
        assert gw.client_run("spoof", "--json", json.dumps(spoofed))["sent"] == 1
        left = gw.tcp("198.51.100.11", LEFT_ALONE_PORT, "left alone", timeout=1)
        assert not left["ok"], left
        assert div.stop() == 0, div.stderr()
    finally:
        client_cap.stop()
        own.kill()
        own.wait(timeout=10)
        div.kill()
        harness.nftdivert(gw.diverter_ns, "remove")

    seen, captured = packets(tmp_path / "client.pcap"), packets(pcap)
    left_alone = [r for r in seen if far_end(r)[1] == str(LEFT_ALONE_PORT)]
    assert left_alone, "the client's capture missed the left-alone SYN: the comparison proves nothing"
    # Every packet the client exchanged, each once, as the client saw it; nothing left alone.
    expected = Counter(r for r in seen if r not in left_alone)
    assert Counter(captured) == expected, (
        f"only in the pcap: {list((Counter(captured) - expected).elements())[:10]}\n"
        f"only on the client's link: {list((expected - Counter(captured)).elements())[:10]}")

    far = Counter(far_end(r) for r in captured)
    for end in (("198.51.100.7", "45678"), ("198.51.100.8", "5353"), ("198.51.100.10", str(BOUND_PORT)),
                ("198.51.100.9", ""), ("2001:db8:ffff::9", ""), ("198.51.100.53", "53"),
                ("2001:db8:ffff::53", "53")):
        assert far[end] >= 2, f"{end} missing from the pcap: {far}"  # asked and answered
    assert far[(SPOOFED, "40000")] == 1, far  # the spoofed datagram, and no answer
    # The original destinations only: never the diverter's own address or the listener's port.
    assert not {a for a, _ in far} & {harness.DIV_CLIENT4, harness.DIV_CLIENT6}, far
    assert not any(p == str(harness.LISTENER_PORT) for _, p in far), far
    assert f"capture {pcap}: {len(captured)} packets, 0 overruns" in div.stderr(), div.stderr()
