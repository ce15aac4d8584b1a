"""The built-in listeners in their own process: ready, events, counters, errors, no orphans."""

from __future__ import annotations

import ipaddress
import socket
import time

import dns.message
import pytest

from nftdivert.config import Config, Listener
from nftdivert.listener_process import ListenerProcess
from test_listeners import free_port


def wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def ports():
    return {"tcp": free_port(socket.SOCK_STREAM), "dns": free_port(socket.SOCK_DGRAM)}


def config(ports) -> Config:
    return Config(listeners=(Listener("t", "tcp", ports["tcp"]), Listener("d", "udp", ports["dns"], kind="dns"),
                             Listener("x", "tcp", 9, kind="external")),
                  default_tcp_listener="t", default_udp_listener=None)


def test_serves_reports_counters_and_dns_answers_then_leaves_no_process(ports):
    questions = []
    proc = ListenerProcess(config(ports))
    proc.on_question = lambda *q: questions.append(q)
    proc.start()
    child = proc._process
    try:
        with socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5) as s:
            s.sendall(b"hello")
            assert s.recv(5) == b"hello"
        query = dns.message.make_query("c2.example", "A")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(query.to_wire(), ("127.0.0.1", ports["dns"]))
            answer = str(dns.message.from_wire(s.recvfrom(4096)[0]).answer[0][0])
        wait(lambda: questions and proc.stats["t"].bytes_received == 5)
        assert questions[0][1:] == ("c2.example", "A", answer)
        assert proc.name_for(ipaddress.ip_address(answer)) == "c2.example"
        assert "x" not in proc.stats  # external: someone else's program
    finally:
        proc.stop()
    assert not child.is_alive()
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", ports["tcp"]))


def test_a_taken_port_is_an_error_naming_the_listener(ports):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::", ports["tcp"]))
        taken.listen()
        proc = ListenerProcess(config(ports))
        with pytest.raises(OSError, match=f"listener t \\(tcp port {ports['tcp']}\\)"):
            proc.start()
        assert proc._process is None
