"""[[custom]] answers on real loopback sockets: fixed bytes by `when`, scripts, errors, matching."""

from __future__ import annotations

import hashlib
import ipaddress
import queue
import socket

import pytest

from nftdivert.config import CustomRule, Listener, PortRange, RecognizeConfig
from nftdivert.services.custom import Rules
from nftdivert.services.listeners import Listeners


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return s.getsockname()[1]


class Asked:
    """The origin question's answer: what the client 'asked for' is set by the test."""

    def __init__(self) -> None:
        self.original = ("198.51.100.9", 4444)

    async def __call__(self, client, local, protocol=None):
        return self.original


@pytest.fixture
def serve():
    started = []

    def start(*rules: CustomRule):
        port, records, asked = free_port(), queue.Queue(), Asked()
        lst = Listeners((Listener("t", "tcp", port), Listener("u", "udp", port)), on_event=records.put,
                        origin=asked, recognize=RecognizeConfig(wait=0.3), custom=rules)
        lst.start()
        started.append(lst)
        return port, records, asked

    yield start
    for lst in started:
        lst.stop()


def tcp(port: int, send: bytes = b"", want: int = 1 << 16) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        if send:
            s.sendall(send)
        while len(got) < want and (more := s.recv(65536)):
            got += more
        return got


def udp(port: int, data: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(data, ("127.0.0.1", port))
        return s.recv(65536)


def rule(**values) -> CustomRule:
    values.setdefault("name", "r")
    return CustomRule(**values)


def records_of(records: queue.Queue, count: int) -> list[dict]:
    """The first `count` custom records, waited for (a TCP record comes when its conversation ends)."""
    found: list[dict] = []
    while len(found) < count:
        rec = records.get(timeout=10)
        if rec.get("event") == "custom":
            found.append(rec)
    return found


def test_a_banner_is_sent_on_connection_before_the_client_speaks(serve):
    port, records, _ = serve(rule(protocol="tcp", ports=(PortRange(4444, 4444),), static="HELLO\r\n"))
    assert tcp(port, want=7) == b"HELLO\r\n"
    rec = records_of(records, 1)[0]
    assert (rec["rule"], rec["sent"], rec["original_destination"]) == ("r", 7, "198.51.100.9:4444")


def test_after_first_message_and_every_message(serve):
    port, records, asked = serve(rule(protocol="tcp", hex="6f6b", when="after_first_message", hosts=(
        ipaddress.ip_network("198.51.100.0/24"),)), rule(name="every", protocol="tcp", static="!", when="every_message"))
    assert tcp(port, b"knock", want=2) == b"ok"
    asked.original = ("203.0.113.5", 80)  # not the first rule's hosts
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(3):
            s.sendall(b"x")
            assert s.recv(10) == b"!"
    found = records_of(records, 2)
    assert found[0]["received"] == 5 and found[0]["sha256"] == hashlib.sha256(b"knock").hexdigest()
    assert found[1]["rule"] == "every" and found[1]["sent"] == 3 and found[1]["received"] == 3


def test_no_matching_rule_leaves_the_default_answer(serve):
    port, records, _ = serve(rule(protocol="tcp", ports=(PortRange(5555, 5555),), static="no"))
    assert tcp(port, b"echo me", want=7) == b"echo me"
    assert not [r for r in records.queue if r.get("event") == "custom"]


def test_a_tcp_script_talks_and_its_exception_ends_only_its_conversation(serve, tmp_path):
    script = tmp_path / "beacon.py"
    script.write_text("async def tcp(conn):\n"
                      "    if conn.first == b'boom':\n"
                      "        raise ValueError('bad beacon')\n"
                      "    await conn.send(b'got ' + conn.first + b' for ' + conn.original.encode())\n")
    port, records, _ = serve(rule(protocol="tcp", script=str(script)))
    assert tcp(port, b"boom") == b""
    assert tcp(port, b"ping") == b"got ping for 198.51.100.9:4444"
    failed, ok = records_of(records, 2)
    assert failed["error"] == "ValueError: bad beacon" and "error" not in ok and ok["sent"] == 30


def test_udp_fixed_answer_by_when_and_a_script(serve, tmp_path):
    script = tmp_path / "decode.py"
    script.write_text("def udp(datagram, info):\n"
                      "    if datagram == b'boom':\n"
                      "        raise KeyError('x')\n"
                      "    return datagram[::-1] + f' {info.count} {info.original}'.encode()\n")
    port, records, asked = serve(rule(protocol="udp", ports=(PortRange(53, 53),), static="A"),
                                 rule(name="s", protocol="udp", script=str(script)))
    asked.original = ("198.51.100.9", 53)
    assert udp(port, b"q1") == b"A"
    assert udp(port, b"q2") == b"A"
    asked.original = ("198.51.100.9", 9999)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        for data in (b"abc", b"boom", b"xyz"):
            s.sendto(data, ("127.0.0.1", port))
        assert s.recv(100) == b"cba 1 198.51.100.9:9999"
        assert s.recv(100) == b"zyx 3 198.51.100.9:9999"  # the datagram that raised got no answer
    found = records_of(records, 5)
    assert [r.get("error") for r in found] == [None, None, None, "KeyError: 'x'", None]
    assert {r["client_address"] for r in found} == {"127.0.0.1"}


def test_udp_after_first_message_skips_each_client_ports_first_datagram():
    rules = Rules((rule(protocol="udp", static="A", when="after_first_message"),), "udp")
    matched, records = rules.match(("198.51.100.9", 53)), []
    answers = [rules.answer_udp(matched, b"q", client, ("198.51.100.9", 53), {}, records.append)
               for client in (("192.0.2.2", 1000), ("192.0.2.2", 1000), ("192.0.2.2", 1001))]
    assert answers == [None, b"A", None] and [r["sent"] for r in records] == [0, 1, 0]


def test_names_match_the_pool_name_of_the_address():
    class Resolver:
        def name_for(self, address):
            return "beacon.c2.example" if str(address) == "198.18.0.7" else None

    rules = Rules((rule(protocol="tcp", names=("*.c2.example",), static="x"),), "tcp", Resolver())
    assert rules.match(("198.18.0.7", 443))[1] == "beacon.c2.example"
    assert rules.match(("198.18.0.8", 443)) is None
    assert Rules((rule(protocol="udp", static="x"),), "tcp").match(("198.18.0.7", 1)) is None  # other protocol


def test_a_script_that_raises_at_load_stops_the_start(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import no_such_module_here\nasync def tcp(conn):\n    pass\n")
    with pytest.raises(OSError, match="does not load: ModuleNotFoundError"):
        Rules((rule(protocol="tcp", script=str(script)),), "tcp")
