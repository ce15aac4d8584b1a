"""The built-in listeners in their own process: ready, events, counters, errors, no orphans."""

from __future__ import annotations

import ipaddress
import socket
import time

import dns.message
import pytest

from nftdivert.config import Config, DnsConfig, Listener
from nftdivert.services.listener_process import ListenerProcess
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
    children = proc.processes
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
        assert questions[0][1:] == ("c2.example", "A", answer, "NOERROR", None)  # no profile selects it
        assert proc.name_for(ipaddress.ip_address(answer)) == "c2.example"
        assert "x" not in proc.stats  # external: someone else's program
    finally:
        proc.stop()
    assert children and not any(c.is_alive() for c in children)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", ports["tcp"]))


def test_a_tasks_profile_reaches_every_process_before_choose_returns(ports):
    """Two processes: the DNS listener in the first answers by the task's profile once choose()
    returns, and by the client's address (none) once the task's choice is gone."""
    from dataclasses import replace

    from nftdivert.config import Profile
    from nftdivert.tasks import TaskTable

    questions, events = [], []
    chosen = replace(config(ports), listener_processes=2,
                     profiles=(Profile("sinkhole", dns=DnsConfig(one_address="198.51.100.80")),))
    proc = ListenerProcess(chosen)
    proc.on_question = lambda *q: questions.append(q)
    proc.on_event = events.append
    proc.start()

    def ask() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(dns.message.make_query("c2.example", "A").to_wire(), ("127.0.0.1", ports["dns"]))
            return str(dns.message.from_wire(s.recvfrom(4096)[0]).answer[0][0])

    try:
        pooled = ask()
        task = TaskTable().started("t1", (ipaddress.ip_network("127.0.0.1/32"),), time.time(), profile="sinkhole")
        assert proc.choose(task.choosing(time.time()))
        assert [child.chosen for child in proc._children] == [1, 1]
        assert ask() == "198.51.100.80"
        proc.reload(chosen)  # a reload changes the profiles, not the tasks' choice
        wait(lambda: events)
        assert events == [{"event": "reload", "sections": ["custom", "dns", "http", "profiles"]}]
        assert ask() == "198.51.100.80"
        assert proc.choose(TaskTable())
        assert ask() == pooled
        wait(lambda: len(questions) == 4)
        assert [q[-1] for q in questions] == [None, "sinkhole", "sinkhole", None]  # each answer's profile
    finally:
        proc.stop()


def test_a_taken_port_is_an_error_naming_the_listener(ports):
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.bind(("::", ports["tcp"]))
        taken.listen()
        proc = ListenerProcess(config(ports))
        with pytest.raises(OSError, match=f"listener t \\(tcp port {ports['tcp']}\\)"):
            proc.start()
        assert proc.processes == []


def test_names_follow_recycling_exactly_at_the_moment_asked(ports):
    """A pool of two: every new name recycles an address. Right after each
    answer, the parent already knows the new name, and still knows which name
    the address stood for before."""
    recycled = []
    cfg = Config(listeners=(Listener("d", "udp", ports["dns"], kind="dns"),), default_tcp_listener=None,
                 default_udp_listener=None, dns=DnsConfig(answer_v4="203.0.113.0/30"))
    proc = ListenerProcess(cfg)
    proc.on_recycled = lambda *r: recycled.append(r)
    proc.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            held = {}
            for i in range(100):
                name = f"n{i}.example"
                s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", ports["dns"]))
                address = ipaddress.ip_address(str(dns.message.from_wire(s.recvfrom(4096)[0]).answer[0][0]))
                now = time.time()  # a conversation starting right now, to the address just answered
                assert proc.name_for(address, now) == name
                if address in held:
                    assert proc.name_for(address, held[address][1]) == held[address][0]
                held[address] = (name, now)
        wait(lambda: len(recycled) == 98)
        assert [r[1:] for r in recycled[:2]] == [("203.0.113.1", "n0.example", "n2.example"),
                                                 ("203.0.113.2", "n1.example", "n3.example")]
    finally:
        proc.stop()
