"""ctnetlink: original destinations from the real conntrack table; its messages, against a fake kernel.

A client namespace reaches documentation addresses through a "diverter"
namespace whose nftables ruleset redirects everything not local to itself;
listeners there report each conversation exactly as the worker would see it
(client address/port, local address after NAT, port unchanged), and the
lookup has to give back the address the client really asked for.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import queue
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest

import netns
import unprivileged
from nftdivert.netlink import codec
from nftdivert.netlink import ctnetlink as ct_mod
from nftdivert.netlink.ctnetlink import Conntrack, ConntrackError

kernel = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

RULESET = """\
table inet t {
	chain p {
		type nat hook prerouting priority dstnat; fib daddr type != local redirect
	}
}
"""

TCP_PORT = 45678
UDP_PORT = 5353

# Diverter side: report every conversation as the worker sees it, after NAT.
LISTENER = r"""
import json, selectors, socket, struct, sys
IP_PKTINFO = 8  # linux/in.h; not exported by the socket module
def out(**kw):
    print(json.dumps(kw), flush=True)
sel = selectors.DefaultSelector()
for family, kind, port in ((socket.AF_INET, socket.SOCK_STREAM, %(tcp)d), (socket.AF_INET6, socket.SOCK_STREAM, %(tcp)d),
                           (socket.AF_INET, socket.SOCK_DGRAM, %(udp)d), (socket.AF_INET6, socket.SOCK_DGRAM, %(udp)d)):
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if kind == socket.SOCK_DGRAM:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        s.listen()
    sel.register(s, selectors.EVENT_READ)
kept = []
out(ready=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        version = 6 if s.family == socket.AF_INET6 else 4
        if s.type == socket.SOCK_STREAM:
            conn, peer = s.accept()
            kept.append(conn)  # keep the conversation open
            local = conn.getsockname()
            conn.sendall(b"ok")
            out(version=version, proto=6, client=peer[0], cport=peer[1], local=local[0], lport=local[1])
        else:
            data, anc, _, peer = s.recvmsg(2048, 256)
            local = None
            for level, kind, cdata in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                    local = socket.inet_ntop(socket.AF_INET, cdata[8:12])  # in_pktinfo.ipi_addr
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                    local = socket.inet_ntop(socket.AF_INET6, cdata[:16])  # in6_pktinfo.ipi6_addr
            s.sendto(b"ok", peer)
            out(version=version, proto=17, client=peer[0], cport=peer[1], local=local, lport=s.getsockname()[1])
""" % {"tcp": TCP_PORT, "udp": UDP_PORT}

# Client side: talk to an arbitrary address, insist on the answer coming back.
CLIENT = r"""
import socket, sys
host, port, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((host, port))
s.send(b"hello")
assert s.recv(16) == b"ok"
print(s.getsockname()[1])
"""

# Diverter side: the lookup as the logging thread would do it.
LOOKUP = r"""
import ipaddress, json, sys
from nftdivert.netlink.ctnetlink import Conntrack
queries = json.loads(sys.argv[1])
packed = lambda a: ipaddress.ip_address(a).packed
results = []
with Conntrack() as ct:
    for q in queries:
        args = (q["version"], q["proto"], packed(q["client"]), q["cport"], packed(q["local"]), q["lport"])
        e = ct.entry(*args)
        results.append(None if e is None else [str(ipaddress.ip_address(e.dst)), e.dst_port])
print(json.dumps(results))
"""


class Lab:
    def __init__(self, make):
        self.client = make("client")
        self.diverter = make("diverter")
        netns.link(self.client, "eth0", ["192.0.2.2/24", "2001:db8:1::2/64"],
                   self.diverter, "eth0", ["192.0.2.1/24", "2001:db8:1::1/64"])
        self.client.run("ip", "route", "add", "default", "via", "192.0.2.1")
        self.client.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
        self.diverter.run("nft", "-f", "-", input=RULESET)
        self.listener = self.diverter.popen(sys.executable, "-c", LISTENER, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        assert self.event() == {"ready": True}

    def _pump(self):
        for line in self.listener.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def event(self, timeout: float = 10) -> dict:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("listener reported nothing") from None
        if got is None:
            raise AssertionError(f"listener died: {self.listener.stderr.read()}")
        return got

    def converse(self, host: str, port: int, kind: str) -> dict:
        """One conversation from the client; the listener's view of it."""
        cport = int(self.client.run(sys.executable, "-c", CLIENT, host, str(port), kind).stdout)
        seen = self.event()
        assert seen["cport"] == cport and seen["local"] is not None
        return seen

    def lookup(self, queries: list[dict]) -> list:
        proc = self.diverter.run(sys.executable, "-c", LOOKUP, json.dumps(queries),
                                 env=ENV)
        return json.loads(proc.stdout)


@pytest.fixture
def lab(make_netns):
    return Lab(make_netns)


@kernel
@pytest.mark.parametrize(
    "target, port, kind, version, local",
    [
        ("198.51.100.7", TCP_PORT, "tcp", 4, "192.0.2.1"),
        ("2001:db8:ffff::7", TCP_PORT, "tcp", 6, None),
        ("203.0.113.9", UDP_PORT, "udp", 4, "192.0.2.1"),
        ("2001:db8:ffff::9", UDP_PORT, "udp", 6, None),
    ],
    ids=["tcp4", "tcp6", "udp4", "udp6"],
)
def test_original_destination_after_redirect(lab, target, port, kind, version, local):
    seen = lab.converse(target, port, kind)
    assert seen["version"] == version and seen["lport"] == port
    assert seen["client"] == ("192.0.2.2" if version == 4 else "2001:db8:1::2")
    if local:  # IPv4 redirect goes to the primary address of the incoming interface
        assert seen["local"] == local
    assert lab.lookup([seen]) == [[target, port]]


@kernel
def test_several_conversations_one_socket(lab):
    """Distinct entries told apart, over one reused socket, without retries."""
    seen = [lab.converse("198.51.100.7", TCP_PORT, "tcp"),
            lab.converse("198.51.100.8", TCP_PORT, "tcp"),
            lab.converse("2001:db8:ffff::7", TCP_PORT, "tcp"),
            lab.converse("203.0.113.9", UDP_PORT, "udp")]
    assert lab.lookup(seen) == [["198.51.100.7", TCP_PORT], ["198.51.100.8", TCP_PORT],
                                             ["2001:db8:ffff::7", TCP_PORT], ["203.0.113.9", UDP_PORT]]


# Client side: one bound port towards several addresses on one port, all open at once.
SAME_PORT_CLIENT = r"""
import socket, sys
sport, port, hosts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
kept = []
for host in hosts:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(5)
    s.bind(("0.0.0.0", sport))
    s.connect((host, port))
    assert s.recv(16) == b"ok"
    kept.append(s)
print(sport)
"""


@kernel
def test_entry_finds_a_conversation_whose_client_port_the_kernel_remapped(lab):
    """The second conversation from one client port to another address on the
    same port reaches the listener from another port (NAT at input 100). Its
    reply tuple names that port, and the entry behind it has the original."""
    hosts = ["198.51.100.90", "198.51.100.91", "198.51.100.92"]
    lab.client.run(sys.executable, "-c", SAME_PORT_CLIENT, "5000", str(TCP_PORT), *hosts)
    seen = [lab.event() for _ in hosts]
    ports = [s["cport"] for s in seen]
    assert ports[0] == 5000 and len(set(ports)) == 3, ports  # the kernel remapped two of them
    snippet = (
        "import ipaddress, json, sys\n"
        "from nftdivert.netlink.ctnetlink import Conntrack\n"
        "p = lambda a: ipaddress.ip_address(a).packed\n"
        "with Conntrack() as ct:\n"
        "    out = [ct.entry(4, 6, p('192.0.2.2'), port, p('192.0.2.1'), %d) for port in json.loads(sys.argv[1])]\n"
        "print(json.dumps([[str(ipaddress.ip_address(e.src)), e.src_port, str(ipaddress.ip_address(e.dst)),"
        " e.dst_port, e.id != 0, e.seen_reply] for e in out]))\n" % TCP_PORT)
    got = json.loads(lab.diverter.run(sys.executable, "-c", snippet, json.dumps(ports), env=ENV).stdout)
    assert got == [["192.0.2.2", 5000, host, TCP_PORT, True, True] for host in hosts]


@kernel
def test_an_entry_is_deleted_by_its_reply_tuple_and_only_with_its_id(lab):
    """What clears a stale answer when the socket behind it is not one in
    TIME_WAIT: the new conversation's entry goes, and only that one."""
    seen = lab.converse("198.51.100.7", TCP_PORT, "tcp")
    snippet = (
        "import ipaddress, sys\n"
        "from nftdivert.netlink.ctnetlink import Conntrack\n"
        "p = lambda a: ipaddress.ip_address(a).packed\n"
        "tup = (4, 6, p('192.0.2.2'), int(sys.argv[1]), p('192.0.2.1'), %d)\n"
        "with Conntrack() as ct:\n"
        "    e = ct.entry(*tup)\n"
        "    print(ct.delete(*tup, e.id ^ 1), ct.entry(*tup) == e)\n"  # another id: left alone
        "    print(ct.delete(*tup, e.id), ct.entry(*tup))\n"
        "    print(ct.delete(*tup, e.id))\n" % TCP_PORT)
    out = lab.diverter.run(sys.executable, "-c", snippet, str(seen["cport"]), env=ENV).stdout.split()
    assert out == ["False", "True", "True", "None", "False"]


@kernel
def test_no_entry_is_none(lab):
    seen = lab.converse("198.51.100.7", TCP_PORT, "tcp")
    other_port = dict(seen, cport=(seen["cport"] + 1) % 65536 or 1)
    other_proto = dict(seen, proto=17)  # same addresses and ports, but UDP
    other_local_port = dict(seen, lport=seen["lport"] + 1)
    never = {"version": 6, "proto": 6, "client": "2001:db8:1::2", "cport": 1, "local": "2001:db8:1::1", "lport": 2}
    queries = [other_port, other_proto, other_local_port, never, seen]
    assert lab.lookup(queries) == [None, None, None, None, ["198.51.100.7", TCP_PORT]]


@kernel
def test_no_entry_in_an_empty_namespace(make_netns):
    """Conntrack not even in use in the namespace: still just None."""
    ns = make_netns("empty")
    proc = ns.run(sys.executable, "-c", LOOKUP, json.dumps(
        [{"version": 4, "proto": 6, "client": "192.0.2.2", "cport": 40000, "local": "192.0.2.1", "lport": 80}]),
        "once", env=ENV)
    assert json.loads(proc.stdout) == [None]


@kernel
def test_without_cap_net_admin_raises(make_netns):
    """Any failure but "not found" is an OSError with the kernel's errno."""
    ns = make_netns("unpriv")
    snippet = (
        "import errno\n"
        "from nftdivert.netlink.ctnetlink import Conntrack, ConntrackError\n"
        "try:\n"
        "    Conntrack().entry(4, 6, bytes(4), 1, bytes(4), 2)\n"
        "except ConntrackError as e:\n"
        "    assert isinstance(e, OSError) and e.errno == errno.EPERM, e\n"
        "    print('EPERM', e)\n"
    )
    proc = ns.run(*unprivileged.python("-c", snippet), env=unprivileged.env(ENV))
    assert proc.stdout.startswith("EPERM"), proc.stdout


# -- message handling, against a fake kernel ---------------------------------

V4_CLIENT = ipaddress.ip_address("192.0.2.2").packed
V4_LOCAL = ipaddress.ip_address("192.0.2.1").packed
V4_ORIG = ipaddress.ip_address("198.51.100.7").packed


def _nlmsg(msg_type: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    msg = codec.NLMSGHDR.pack(codec.NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload
    return msg + b"\0" * (-len(msg) % 4)


def _error(seq: int, error: int, reason: str = "") -> bytes:
    payload = struct.pack("=i", error) + codec.NLMSGHDR.pack(16, 0, 0, seq, 0)
    flags = codec.NLM_F_CAPPED
    if reason:
        payload += codec.attr(codec.NLMSGERR_ATTR_MSG, reason.encode() + b"\0")
        flags |= codec.NLM_F_ACK_TLVS
    return _nlmsg(codec.NLMSG_ERROR, seq, payload, flags)


def _entry(seq: int, dst: bytes, dport: int, *, nested_flag: bool = True, extra: bytes = b"") -> bytes:
    """A ctnetlink entry message, with odd-length attributes to exercise padding."""
    nla = codec.attr

    def tuple_attr(kind, src, dst, sport, dport):
        ip = nla(ct_mod.CTA_IP_V4_SRC, src) + nla(ct_mod.CTA_IP_V4_DST, dst)
        proto = (nla(ct_mod.CTA_PROTO_NUM, b"\x06") + nla(ct_mod.CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
                 + nla(ct_mod.CTA_PROTO_DST_PORT, struct.pack("!H", dport)))
        return nla(kind, nla(ct_mod.CTA_TUPLE_IP, ip, nested_flag) + nla(ct_mod.CTA_TUPLE_PROTO, proto, nested_flag),
                   nested_flag)

    body = (codec.NFGENMSG.pack(socket.AF_INET, 0, 0)
            + nla(99, b"xyz")  # unknown, 3 bytes: padded
            + tuple_attr(ct_mod.CTA_TUPLE_ORIG, V4_CLIENT, dst, 40000, dport)
            + tuple_attr(ct_mod.CTA_TUPLE_REPLY, V4_LOCAL, V4_CLIENT, dport, 40000)
            + extra)
    return _nlmsg((ct_mod.NFNL_SUBSYS_CTNETLINK << 8) | ct_mod.IPCTNL_MSG_CT_NEW, seq, body)


@pytest.fixture
def fake():
    """A Conntrack whose socket is one end of a socketpair: datagrams queued
    on the other end are what "the kernel" answers. Its next seq is 1."""
    ct = Conntrack()
    ct._sock.close()
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.settimeout(1)
    ct._sock = ours
    yield ct, kernel
    ct.close()
    kernel.close()


def _ask(ct):
    """(original destination, port) of the conversation 192.0.2.2:40000 -> 192.0.2.1:45678, or None."""
    found = ct.entry(4, 6, V4_CLIENT, 40000, V4_LOCAL, 45678)
    return None if found is None else (found.dst, found.dst_port)


def test_request_layout():
    msg = ct_mod.build_get_request(7, 4, 6, V4_CLIENT, 40000, V4_LOCAL, 45678)
    length, msg_type, flags, seq, _ = codec.NLMSGHDR.unpack_from(msg)
    assert length == len(msg) and seq == 7 and msg_type == 0x0101
    assert flags == codec.NLM_F_REQUEST | codec.NLM_F_ACK
    assert msg[16] == socket.AF_INET
    attrs = codec.attrs(msg[20:])
    assert list(attrs) == [ct_mod.CTA_TUPLE_REPLY]
    assert struct.unpack_from("=H", msg, 22)[0] & codec.NLA_F_NESTED
    reply = codec.attrs(attrs[ct_mod.CTA_TUPLE_REPLY])
    ip = codec.attrs(reply[ct_mod.CTA_TUPLE_IP])
    proto = codec.attrs(reply[ct_mod.CTA_TUPLE_PROTO])
    assert bytes(ip[ct_mod.CTA_IP_V4_SRC]) == V4_LOCAL and bytes(ip[ct_mod.CTA_IP_V4_DST]) == V4_CLIENT
    assert bytes(proto[ct_mod.CTA_PROTO_NUM]) == b"\x06"
    assert bytes(proto[ct_mod.CTA_PROTO_SRC_PORT]) == struct.pack("!H", 45678)
    assert bytes(proto[ct_mod.CTA_PROTO_DST_PORT]) == struct.pack("!H", 40000)


def test_bad_arguments():
    with pytest.raises(ValueError):
        ct_mod.build_get_request(1, 5, 6, V4_CLIENT, 1, V4_LOCAL, 2)
    with pytest.raises(ValueError):
        ct_mod.build_get_request(1, 6, 6, V4_CLIENT, 1, V4_LOCAL, 2)
    with pytest.raises(ValueError):
        ct_mod.build_get_request(1, 4, 1, V4_CLIENT, 1, V4_LOCAL, 2)
    with pytest.raises(ValueError):
        ct_mod.build_get_request(1, 4, 6, V4_CLIENT, 70000, V4_LOCAL, 2)


@pytest.mark.parametrize("nested_flag", [True, False])
def test_entry_then_ack_in_one_datagram(fake, nested_flag):
    ct, kernel = fake
    kernel.send(_entry(1, V4_ORIG, 45678, nested_flag=nested_flag) + _error(1, 0))
    assert _ask(ct) == (V4_ORIG, 45678)


def test_stale_answers_are_skipped(fake):
    ct, kernel = fake
    ct._seq = 41  # this request is 42; 41 timed out earlier and answers late
    kernel.send(_entry(41, ipaddress.ip_address("203.0.113.99").packed, 1))
    kernel.send(_error(41, 0))
    kernel.send(_entry(42, V4_ORIG, 45678))
    kernel.send(_error(42, 0))
    assert _ask(ct) == (V4_ORIG, 45678)


def test_enoent_is_none_and_other_errors_raise(fake):
    ct, kernel = fake
    kernel.send(_error(1, -2))
    assert _ask(ct) is None
    kernel.send(_error(2, -22, "missing tuple"))
    with pytest.raises(ConntrackError) as info:
        _ask(ct)
    assert info.value.errno == 22 and "missing tuple" in str(info.value)
    assert isinstance(info.value, OSError)


def test_truncated_attribute_is_a_format_error(fake):
    ct, kernel = fake
    good = _entry(1, V4_ORIG, 45678)
    bad = bytearray(good)
    struct.pack_into("=H", bad, 20, 0xFFF0)  # first attribute claims to run past the end
    kernel.send(bytes(bad))
    with pytest.raises(ct_mod.NetlinkFormatError):
        _ask(ct)


def test_no_answer_times_out(fake):
    ct, _ = fake
    ct._sock.settimeout(0.05)
    with pytest.raises(ConntrackError) as info:
        _ask(ct)
    assert info.value.errno == errno.ETIMEDOUT


def test_closed():
    ct = Conntrack()
    ct.close()
    ct.close()
    with pytest.raises(ValueError):
        _ask(ct)


def _status_and_id(status: int, ct_id: int) -> bytes:
    return (codec.attr(ct_mod.CTA_STATUS, struct.pack("!I", status))
            + codec.attr(ct_mod.CTA_ID, struct.pack("!I", ct_id)))


@pytest.mark.parametrize("status, seen_reply", [(0x0, False), (0x8, False), (0xE, True)])
def test_parse_entry_reads_the_original_tuple_id_and_seen_reply(status, seen_reply):
    msg = _entry(1, V4_ORIG, 45678, extra=_status_and_id(status, 0xDEADBEEF))
    entry = ct_mod.parse_entry(msg[codec.NLMSGHDR.size:])
    assert entry == ct_mod.Entry(V4_CLIENT, 40000, V4_ORIG, 45678, 0xDEADBEEF, seen_reply)


def test_parse_entry_without_status_or_id():
    entry = ct_mod.parse_entry(_entry(1, V4_ORIG, 45678)[codec.NLMSGHDR.size:])
    assert (entry.id, entry.seen_reply) == (0, False)


def test_parse_entry_refuses_a_status_that_is_not_four_bytes():
    msg = _entry(1, V4_ORIG, 45678, extra=codec.attr(ct_mod.CTA_STATUS, b"\x00\x02"))
    with pytest.raises(ct_mod.NetlinkFormatError):
        ct_mod.parse_entry(msg[codec.NLMSGHDR.size:])


def test_entry_by_reply_tuple(fake):
    ct, kernel = fake
    kernel.send(_entry(1, V4_ORIG, 45678, extra=_status_and_id(0x2, 9)) + _error(1, 0))
    assert ct.entry(4, 6, V4_CLIENT, 41000, V4_LOCAL, 45678) == ct_mod.Entry(V4_CLIENT, 40000, V4_ORIG, 45678, 9, True)


def test_other_subsystems_messages_are_not_events():
    assert ct_mod.event_kind(0x100) == "new" and ct_mod.event_kind(0x102) == "destroy"
    assert ct_mod.event_kind(0x101) is None and ct_mod.event_kind(0x200) is None


def test_the_dump_request_asks_the_kernel_to_filter_by_our_mark():
    body = ct_mod.build_dump_request(socket.AF_INET6, 0x200000)
    assert body[0] == socket.AF_INET6
    attrs = codec.attrs(body[codec.NFGENMSG.size:])
    assert bytes(attrs[8]) == bytes(attrs[21]) == struct.pack("!I", 0x200000)
