"""Several listener processes sharing the ports: the kernel spreads connections over them,
a UDP conversation stays on one, the DNS pool has one owner, the counters sum."""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import ssl
import threading

import dns.message
import pytest

from nftdivert.config import Config, ConfigError, DnsConfig, Listener, TlsConfig, from_mapping
from nftdivert.services.listener_process import ListenerProcess, process_count
from test_listener_process import wait
from test_listeners import free_port

PROCESSES = 2


@pytest.fixture
def running():
    ports = {"tcp": free_port(socket.SOCK_STREAM), "udp": free_port(socket.SOCK_DGRAM),
             "dns": free_port(socket.SOCK_DGRAM)}
    cfg = Config(listeners=(Listener("t", "tcp", ports["tcp"]), Listener("u", "udp", ports["udp"]),
                            Listener("d", "udp", ports["dns"], kind="dns")),
                 default_tcp_listener="t", default_udp_listener="u", listener_processes=PROCESSES,
                 dns=DnsConfig(answer_v4="198.18.0.0/16"))
    proc = ListenerProcess(cfg)
    proc.start()
    proc.answer_origins(lambda _client, local, _protocol=None: local)  # nothing diverted: asked where it arrived
    done = threading.Event()
    answering = threading.Thread(target=_answer, args=(proc.origins, done), daemon=True)
    answering.start()
    try:
        yield proc, ports
    finally:
        done.set()
        answering.join()
        proc.stop()


def _answer(servers, done: threading.Event) -> None:
    """The worker's part: every process's origin questions answered (one pipe each)."""
    while not done.is_set():
        for server in select.select(servers, [], [], 0.1)[0]:
            server.answer_pending()


def test_connections_are_spread_over_every_process_and_the_counters_sum(running):
    proc, ports = running
    assert len(proc.processes) == PROCESSES
    for i in range(200):
        with socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5) as s:
            s.sendall(b"x%03d" % i)
            assert s.recv(4) == b"x%03d" % i
    wait(lambda: proc.stats["t"].conversations == 200, timeout=10)
    each = [by["t"].conversations for by in proc.stats_by_process]
    assert sum(each) == 200 and all(each), each  # every process answered some
    assert proc.stats["t"].bytes_received == 800


def test_a_udp_conversation_stays_on_its_process(running):
    """40 clients, 5 datagrams each: a process counts whole conversations only."""
    proc, ports = running
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    try:
        for round_ in range(5):
            for c in clients:
                c.settimeout(5)
                c.sendto(b"r%d" % round_, ("127.0.0.1", ports["udp"]))
                assert c.recvfrom(16)[0] == b"r%d" % round_
    finally:
        for c in clients:
            c.close()
    wait(lambda: proc.stats["u"].conversations == 200, timeout=10)
    each = [by["u"].conversations for by in proc.stats_by_process]
    assert all(each) and all(n % 5 == 0 for n in each), each


def test_one_dns_pool_for_the_run_and_its_names_known_to_the_parent(running):
    proc, ports = running
    given = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        for round_ in range(2):
            for i in range(1000):
                name = f"n{i}.example"
                s.sendto(dns.message.make_query(name, "A").to_wire(), ("127.0.0.1", ports["dns"]))
                address = str(dns.message.from_wire(s.recvfrom(4096)[0]).answer[0][0])
                assert given.setdefault(name, address) == address  # the same address both times
    assert len(set(given.values())) == 1000
    for name, address in given.items():
        assert proc.name_for(ipaddress.ip_address(address)) == name
    wait(lambda: proc.stats["d"].conversations == 2000, timeout=10)
    owners = [by.get("d") for by in proc.stats_by_process]
    assert owners[0].conversations == 2000 and all(o is None for o in owners[1:]), owners


def test_dns_over_https_is_answered_from_the_one_pool_whichever_process_takes_it(running):
    """The DNS pool lives in the first process; a DoH request another process accepts asks it there."""
    import base64

    proc, ports = running
    given = {}
    for round_ in range(2):
        for i in range(100):
            name = f"doh{i}.example"
            query = base64.urlsafe_b64encode(dns.message.make_query(name, "A").to_wire()).rstrip(b"=")
            with socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5) as s:
                s.sendall(b"GET /dns-query?dns=" + query + b" HTTP/1.1\r\nHost: dns.example\r\n"
                          b"Connection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"application/dns-message" in head, reply
            address = str(dns.message.from_wire(body).answer[0][0])
            assert given.setdefault(name, address) == address and address.startswith("198.18.")
    assert len(set(given.values())) == 100
    wait(lambda: proc.stats["t"].conversations == 200, timeout=10)
    each = [by["t"].conversations for by in proc.stats_by_process]
    assert all(each), each  # both processes answered some
    for name, address in given.items():
        assert proc.name_for(ipaddress.ip_address(address)) == name
    assert proc.pool_unanswered == 0


def test_processes_zero_means_one_per_usable_cpu_and_bad_values_are_named():
    assert process_count(Config()) == len(os.sched_getaffinity(0))  # the default
    assert process_count(Config(listener_processes=0)) == len(os.sched_getaffinity(0))
    assert process_count(Config(listener_processes=1)) == 1
    for bad in (-1, 65, True, "2"):
        with pytest.raises(ConfigError, match="listener_processes"):
            from_mapping({"listener_processes": bad})


GROWTH_MB = 12  # measured: about 1 MB over 4,000 conversations; 25 MB when every name kept its own context


def _rss_mb(proc: ListenerProcess) -> float:
    return sum(int(open(f"/proc/{p.pid}/statm").read().split()[1]) for p in proc.processes) * os.sysconf(
        "SC_PAGE_SIZE") / 1e6


def test_memory_stays_bounded_over_thousands_of_tls_and_http_conversations(tmp_path):
    port = free_port(socket.SOCK_STREAM)
    cfg = Config(listeners=(Listener("t", "tcp", port),), default_tcp_listener="t", default_udp_listener=None,
                 listener_processes=PROCESSES, tls=TlsConfig(state_dir=str(tmp_path)))
    proc = ListenerProcess(cfg)
    proc.start()
    proc.answer_origins(lambda _client, local, _protocol=None: local)
    done = threading.Event()
    answering = threading.Thread(target=_answer, args=(proc.origins, done), daemon=True)
    answering.start()
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    taken = [0]
    lock = threading.Lock()

    def converse(until: int) -> None:
        while True:
            with lock:
                i = taken[0]
                if i >= until:
                    return
                taken[0] += 1
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                # Half of them TLS, each to one of 2,000 names: every name a leaf of its own.
                s = client.wrap_socket(raw, server_hostname=f"h{i % 2000}.example") if i % 2 else raw
                s.sendall(b"GET /%d HTTP/1.1\r\nHost: h%d.example\r\n\r\n" % (i, i))
                while s.recv(65536):
                    pass

    def batch(until: int) -> None:
        clients = [threading.Thread(target=converse, args=(until,)) for _ in range(40)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()

    try:
        batch(1000)  # warm-up: the libraries imported, the CA loaded
        warm = _rss_mb(proc)
        batch(5000)
        wait(lambda: proc.stats["t"].conversations == 5000, timeout=10)
        grown = _rss_mb(proc) - warm
        assert grown < GROWTH_MB, f"the listeners grew {grown:.1f} MB over 4,000 conversations (from {warm:.1f} MB)"
    finally:
        done.set()
        answering.join()
        proc.stop()


@pytest.mark.parametrize("kind, protocol", [(socket.SOCK_STREAM, "tcp"), (socket.SOCK_DGRAM, "udp")])
def test_a_port_another_program_shares_by_reuseport_is_an_error_not_a_share(kind, protocol):
    """SO_REUSEPORT would let our processes join a group another program (or run) holds,
    and the kernel would give that program some of the clients."""
    port = free_port(kind)
    with socket.socket(socket.AF_INET6, kind) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            other.listen()
        cfg = Config(listeners=(Listener("l", protocol, port),), default_tcp_listener=None, default_udp_listener=None,
                     listener_processes=PROCESSES)
        proc = ListenerProcess(cfg)
        with pytest.raises(OSError, match=f"listener l \\({protocol} port {port}\\)"):
            proc.start()
        assert proc.processes == []
