"""End to end, real kernel, real packets: what a hostile or merely odd client
meets. The diverter must not give itself away: a port is bound only for the
family and address a conversation would reach, and odd packets (IPv4
options, IPv6 extension headers, an urgent byte, an empty or broadcast
datagram) get the answer an ordinary one gets.

Lab and client programs: tests/lab.py.
"""

from __future__ import annotations

import pytest

import lab

pytestmark = pytest.mark.kernel


@pytest.fixture
def div(gw):
    return gw.ensure()


def _serve(ns, servers):
    procs = []
    try:
        for bind, port in servers:
            procs.append(lab.serve_tcp(ns, port, f"own-{bind}-{port}", bind=bind))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs):
    for proc in procs:
        proc.kill()
        proc.wait(timeout=5)


# ---- bound ports: only for the family and address a conversation reaches ----------------

def test_loopback_services_do_not_make_a_port_bound_for_gateway_clients(gw, div):
    ns = gw.diverter_ns
    procs = _serve(ns, [("127.0.0.1", 9000), ("::1", 9001)])
    try:
        # The kernel knows them, each for its own address only.
        lab.wait_bound_set(ns, "tcp", 9000, address="127.0.0.1")
        lab.wait_bound_set(ns, "tcp", 9001, address="::1")
        assert not [e for e in lab.bound_elements(ns, "tcp", 4) if e[1] in (9000, 9001) and e[0] != "127.0.0.1"]
        assert not [e for e in lab.bound_elements(ns, "tcp", 6) if e[1] in (9000, 9001) and e[0] != "::1"]
        for host, port in (("198.51.100.7", 9000), ("2001:db8::7", 9001)):
            r = gw.tcp(host, port, f"echo-{port}")
            assert r["ok"] and r["reply"] == f"echo-{port}", f"{host}:{port}: {r}"  # the default listener's echo
            assert r["peer"] == [host, port], r
        lines = gw.log_barrier(div)
        got = {x["original_destination"] for x in lines}
        assert {"198.51.100.7:9000", "[2001:db8::7]:9001"} <= got, lines
    finally:
        _stop(procs)


def test_an_ipv4_only_service_leaves_ipv6_clients_diverted(gw, div):
    ns = gw.diverter_ns
    procs = _serve(ns, [("0.0.0.0", 8000)])
    try:
        lab.wait_bound_set(ns, "tcp", 8000, address="0.0.0.0/0")
        assert not [e for e in lab.bound_elements(ns, "tcp", 6) if e[1] == 8000]
        v4 = gw.tcp("198.51.100.8", 8000, "to-the-service")
        assert v4["ok"] and v4["reply"] == "own-0.0.0.0-8000", v4  # bound for IPv4: its own socket
        v6 = gw.tcp("2001:db8::8", 8000, "echo-v6-8000")
        assert v6["ok"] and v6["reply"] == "echo-v6-8000", v6  # not for IPv6: the default listener
        assert v6["peer"] == ["2001:db8::8", 8000], v6
    finally:
        _stop(procs)
