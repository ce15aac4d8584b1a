"""DNS pools per profile, end to end: three client namespaces behind one gateway, real `dig`
and `curl`, `nftdivert run` with two listener processes.

Two profiles have pools of their own (the second with a `pool_key`), the
third client is in none. They ask the same name and each gets an address
from its own pool; each connects to the address it got, and every `start`
record names the name and the client's profile. An address from another
profile's pool names its name too, whoever connects to it. A second run
with the same key gives the keyed profile's client the same address for
the name, though it asked other names first.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal

import pytest

import harness
import netns

pytestmark = [pytest.mark.kernel, pytest.mark.any_backend,
              pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (bind9-dnsutils, see the Makefile)")]

A4, B4, C4 = (harness.bridge_client(i) for i in range(3))
A6, B6 = harness.bridge_client(0, 6), harness.bridge_client(1, 6)
POOLS = f"""
[dns]
answer_v4 = "198.18.0.0/16"

[[profiles]]
name = "family-a"
clients = ["{A4}/32", "{A6}/128"]
dns = {{ answer_v4 = "198.19.0.0/17", answer_v6 = "2001:db8:a::/64" }}

[[profiles]]
name = "family-b"
clients = ["{B4}/32", "{B6}/128"]
dns = {{ answer_v4 = "198.19.128.0/17", answer_v6 = "2001:db8:b::/64", pool_key = "lab-b" }}
"""
NET = ipaddress.ip_network


def config(pools: str = POOLS) -> str:
    return ("listener_processes = 2\n" + harness.config_text() + '\n[http]\nbody = "answered\\n"\nbodies_dir = ""\n'
            + harness.ECHO_LISTENERS + harness.DNS_LISTENER + pools)


def reload(div, pools: str) -> dict:
    """The config with these pools, SIGHUP: the next `reload` record."""
    def reloads() -> list[dict]:
        return [r for r in div.log() if r.get("event") == "reload"]
    done = len(reloads())
    div.config_path.write_text(config(pools))
    div.proc.send_signal(signal.SIGHUP)
    return harness.wait_for(lambda: reloads()[done] if len(reloads()) > done else None, 10, "the reload record")


def dig(client, name: str, qtype: str = "A", server: str = harness.DIV_CLIENT4) -> str:
    out = client.run("dig", "+tries=1", "+time=5", "+short", f"@{server}", name, qtype).stdout.strip()
    assert out, f"no {qtype} answer for {name}"
    return out


def curl(client, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    proc = client.run("curl", "-sS", "-m", "10", "-H", "Host: c2.example", f"http://{host}/", check=False)
    return proc.stdout if proc.returncode == 0 else f"curl exit {proc.returncode}: {proc.stderr}"


def start(div, client: str, address: str) -> dict:
    destination = f"[{address}]:80" if ":" in address else f"{address}:80"
    return div.wait_log(lambda r: r.get("event") == "start" and r.get("client_address") == client
                        and r.get("original_destination") == destination, what=f"the start of {client} to {destination}")


def test_each_profile_answers_from_its_own_pool_and_the_log_names_every_address(tmp_path):
    lab = harness.BridgeLab(netns, tmp_path, 3)
    div = None
    try:
        lab.bridge_netfilter(False)
        a, b, c = lab.clients
        div = harness.Diverter(lab.diverter_ns, tmp_path, config(), name="pools").start()
        got = {client: dig(ns, "c2.example") for client, ns in ((A4, a), (B4, b), (C4, c))}
        got6 = {A6: dig(a, "c2.example", "AAAA", harness.DIV_CLIENT6), B6: dig(b, "c2.example", "AAAA")}
        assert ipaddress.ip_address(got[A4]) in NET("198.19.0.0/17"), got
        assert ipaddress.ip_address(got[B4]) in NET("198.19.128.0/17"), got
        assert ipaddress.ip_address(got[C4]) in NET("198.18.0.0/16"), got
        assert ipaddress.ip_address(got6[A6]) in NET("2001:db8:a::/64"), got6
        assert ipaddress.ip_address(got6[B6]) in NET("2001:db8:b::/64"), got6
        profile = {A4: "family-a", A6: "family-a", B4: "family-b", B6: "family-b", C4: None}
        for ns, address in ((a, got[A4]), (b, got[B4]), (c, got[C4]),
                            (a, got6[A6]), (b, got6[B6]), (b, got[A4]), (a, got[B4])):
            assert curl(ns, address) == "answered\n"
        for client, address in (*got.items(), *got6.items()):
            rec = start(div, client, address)
            assert (rec.get("name"), rec.get("profile")) == ("c2.example", profile[client]), rec
        # Another profile's address still names its name; the profile is the connecting client's.
        crossed = (start(div, B4, got[A4]), start(div, A4, got[B4]))
        assert [(r.get("name"), r.get("profile")) for r in crossed] == [("c2.example", "family-b"),
                                                                        ("c2.example", "family-a")], crossed
        questions = [r for r in div.log() if r.get("event") == "dns" and r["name"] == "c2.example"]
        assert {(r["client_address"], r["answer"], r.get("profile")) for r in questions} == {
            (A4, got[A4], "family-a"), (B4, got[B4], "family-b"), (C4, got[C4], None),
            (A6, got6[A6], "family-a"), (B4, got6[B6], "family-b")}, questions

        # A reload keeps each network's pool, a renamed profile's too; a pool the run has not is refused.
        refused = reload(div, POOLS.replace("198.19.0.0/17", "198.19.0.0/18"))
        assert "profiles[0].dns.answer_v4" in refused.get("error", ""), refused
        renamed = reload(div, POOLS.replace('"family-a"', '"family-a2"'))
        assert "error" not in renamed, renamed
        assert dig(a, "c2.example") == got[A4]
        asked = div.wait_log(lambda r: r.get("event") == "dns" and r.get("profile") == "family-a2",
                             what="a's question in the renamed profile")
        assert (asked["name"], asked["answer"]) == ("c2.example", got[A4]), asked
        div.stop_and_check()

        # The same key in another run: the same address for the name, whatever was asked before it.
        div = harness.Diverter(lab.diverter_ns, tmp_path, config(), name="pools-again").start()
        for other in ("first.example", "second.example", "third.example"):
            dig(b, other)
        assert dig(b, "c2.example") == got[B4]
        assert curl(b, got[B4]) == "answered\n"
        rec = start(div, B4, got[B4])
        assert (rec.get("name"), rec.get("profile")) == ("c2.example", "family-b"), rec
        div.stop_and_check()
    finally:
        if div is not None:
            div.kill()
        harness.nftdivert(lab.diverter_ns, "remove", check=False)
        lab.close()
