"""Conntrack event messages -> CtEvent -> start and end records, without a kernel.

The messages are built attribute by attribute as ctnetlink sends them
(linux/netfilter/nfnetlink_conntrack.h), so the parser and the records are
checked against the wire format, not against themselves.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

import communityid
import pytest

from nftdivert.netlink import ctnetlink
from nftdivert.netlink.codec import NFGENMSG, NLMSGHDR, NetlinkFormatError, messages
from nftdivert.netlink.codec import attr as nla
from nftdivert.netlink.ctnetlink import Counters, CtEvent
from nftdivert.observers import convrecords

CLIENT, ASKED, OURS = "192.0.2.2", "198.51.100.7", "192.0.2.1"
# The flow as asked for (the reply came from OURS:1337): what the pcap's packets hash to.
ASKED_FLOW = communityid.CommunityID(seed=0).calc(communityid.FlowTuple.make_tcp(CLIENT, ASKED, 40000, 45678))
START_NS, STOP_NS = 1_800_000_000_250_000_000, 1_800_000_003_750_000_000


def _ip(src: str, dst: str) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    kinds = (1, 2) if a.version == 4 else (3, 4)
    return nla(kinds[0], a.packed) + nla(kinds[1], b.packed)


def _tuple(kind: int, src: str, dst: str, proto: bytes) -> bytes:
    return nla(kind, nla(1, _ip(src, dst), nested=True) + nla(2, proto, nested=True), nested=True)


def _ports(protocol: int, sport: int, dport: int) -> bytes:
    return nla(1, bytes([protocol])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport))


def _icmp(kind: int, code: int, ident: int) -> bytes:
    return nla(1, bytes([1])) + nla(4, struct.pack("!H", ident)) + nla(5, bytes([kind])) + nla(6, bytes([code]))


def _counters(attr: int, packets: int, size: int) -> bytes:
    return nla(attr, nla(1, struct.pack("!Q", packets)) + nla(2, struct.pack("!Q", size)), nested=True)


def message(orig: bytes, reply: bytes, *extra: bytes, mark: int = 0x200000, ct_id: int = 77,
            msg_type: int = 0x100) -> bytes:
    body = NFGENMSG.pack(socket.AF_INET, 0, 0) + orig + reply + nla(12, struct.pack("!I", ct_id)) \
        + nla(8, struct.pack("!I", mark)) + b"".join(extra)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, 0, 0, 0) + body


def tcp_destroy(state: int) -> bytes:
    return message(_tuple(1, CLIENT, ASKED, _ports(6, 40000, 45678)), _tuple(2, OURS, CLIENT, _ports(6, 45678, 40000)),
                   _counters(9, 6, 336), _counters(10, 4, 232),
                   nla(20, nla(1, struct.pack("!Q", START_NS)) + nla(2, struct.pack("!Q", STOP_NS)), nested=True),
                   nla(4, nla(1, nla(1, bytes([state])), nested=True), nested=True), msg_type=0x102)


def parse(data: bytes) -> CtEvent:
    (msg_type, _flags, _seq, payload), = messages(data)
    return ctnetlink.parse_event(ctnetlink.event_kind(msg_type), payload)


def test_a_destroy_event_parses_with_counters_stamps_and_tcp_state():
    ev = parse(tcp_destroy(7))
    assert (ev.kind, ev.id, ev.protocol, ev.version, ev.mark) == ("destroy", 77, 6, 4, 0x200000)
    assert (ev.src_port, ev.dst, ev.dst_port) == (40000, ipaddress.ip_address(ASKED).packed, 45678)
    assert (ev.reply_src, ev.reply_src_port, ev.reply_dst_port) == (ipaddress.ip_address(OURS).packed, 45678, 40000)
    assert ev.sent == Counters(6, 336) and ev.received == Counters(4, 232)
    assert (ev.start_ns, ev.stop_ns, ev.tcp_state) == (START_NS, STOP_NS, 7)


def test_an_icmp_event_has_type_code_and_id_instead_of_ports():
    ev = parse(message(_tuple(1, CLIENT, ASKED, _icmp(8, 0, 4242)), _tuple(2, OURS, CLIENT, _icmp(0, 0, 4242))))
    assert ev.kind == "new" and ev.protocol == 1 and ev.icmp == (8, 0, 4242) and ev.sent is None
    rec = convrecords.start_record(ev, 1_800_000_000.0, ("kernel", None), "eth1")
    assert rec["client"] == rec["client_address"] == CLIENT and rec["original_destination"] == ASKED
    assert rec["icmp"] == {"type": 8, "code": 0, "id": 4242} and "listener_port" not in rec


@pytest.mark.parametrize("cut", [4, 20, 40])
def test_a_truncated_message_is_a_format_error(cut):
    data = tcp_destroy(7)
    with pytest.raises(NetlinkFormatError):
        (t, _f, _s, payload), = messages(NLMSGHDR.pack(NLMSGHDR.size + cut, 0x100, 0, 0, 0) + data[16:16 + cut])
        ctnetlink.parse_event("new", payload)


@pytest.mark.parametrize("state, kind, ended", [(7, "destroy", "closed"), (8, "destroy", "reset"),
                                                (3, "destroy", "timeout"), (3, "live", "open"),
                                                (7, "live", "closed")])
def test_how_a_tcp_conversation_ended(state, kind, ended):
    ev = parse(tcp_destroy(state))
    assert convrecords.ended(CtEvent(**{**ev.__dict__, "kind": kind})) == ended


def test_the_end_record_carries_the_start_records_name_and_listener():
    ev = parse(tcp_destroy(7))
    start = convrecords.start_record(ev, START_NS / 1e9, ("tcp-echo", 1337), "eth1", name="c2.example",
                                     process={"pid": 5, "host_pid": 5, "command": "nc", "uid": 0})
    assert start == {"v": 1, "time": "2027-01-15T08:00:00.250Z", "event": "start", "id": 77, "protocol": "tcp",
                     "client": f"{CLIENT}:40000", "client_address": CLIENT, "original_destination": f"{ASKED}:45678",
                     "community_id": ASKED_FLOW, "name": "c2.example", "listener": "tcp-echo", "listener_port": 1337, "interface": "eth1",
                     "process": {"pid": 5, "host_pid": 5, "command": "nc", "uid": 0}}
    end = convrecords.end_record(ev, now=1_800_000_100.0, start=start)
    assert end == {"v": 1, "time": "2027-01-15T08:00:03.750Z", "event": "end", "id": 77, "protocol": "tcp",
                   "client": f"{CLIENT}:40000", "client_address": CLIENT, "original_destination": f"{ASKED}:45678",
                   "community_id": ASKED_FLOW, "name": "c2.example", "listener": "tcp-echo", "listener_port": 1337, "interface": "eth1",
                   "duration": 3.5,
                   "sent": {"packets": 6, "bytes": 336}, "received": {"packets": 4, "bytes": 232}, "ended": "closed"}


def test_a_client_port_the_kernel_changed_is_the_one_the_listener_saw():
    """The reply tuple names the port the kernel gave the conversation at input NAT."""
    ev = parse(message(_tuple(1, CLIENT, ASKED, _ports(6, 40000, 80)), _tuple(2, OURS, CLIENT, _ports(6, 1337, 51234))))
    assert ev.reply_dst_port == 51234
    start = convrecords.start_record(ev, START_NS / 1e9, ("tcp-echo", 1337), "eth1")
    assert list(start)[5:9] == ["client", "client_address", "listener_client_port", "original_destination"]
    assert start["client"] == f"{CLIENT}:40000" and start["listener_client_port"] == 51234
    assert convrecords.end_record(ev, now=START_NS / 1e9 + 1, start=start)["listener_client_port"] == 51234
    assert "listener_client_port" not in convrecords.start_record(parse(tcp_destroy(7)), 1.0, ("x", 1), "")


def test_without_conntrack_stamps_the_duration_runs_from_the_start_record():
    ev = CtEvent(**{**parse(tcp_destroy(3)).__dict__, "start_ns": 0, "stop_ns": 0, "sent": None, "received": None})
    end = convrecords.end_record(ev, now=110.5, started=100.0)
    assert end["duration"] == 10.5 and end["sent"] is None and end["time"].startswith("1970-01-01T00:01:50.500")
    assert convrecords.end_record(ev, now=110.5)["duration"] is None


def test_the_listener_is_the_one_the_kernel_chose_not_the_hosts_view():
    ev = parse(tcp_destroy(7))  # asked for 45678; the reply tuple keeps 45678
    ours, defaults = {(6, 45678): "ext"}, {6: ("tcp-echo", 1337)}
    unknown = lambda p, a, port: pytest.fail("the kernel's answer needs no view of the host's sockets")  # noqa: E731
    # The port kept, with a default listener: something was bound there, whatever the view says.
    assert convrecords.listener_for(ev, ours, defaults, unknown, False) == ("ext", 45678)
    assert convrecords.listener_for(ev, {}, defaults, unknown, False) == ("host", 45678)
    assert convrecords.listener_for(ev, ours, defaults, unknown, True) == ("tcp-echo", 1337)
    # Only where the kernel cannot tell: the view of the host's sockets.
    for sent in (False, None):
        assert convrecords.listener_for(ev, ours, {}, lambda p, a, port: False, sent) == ("", None)
        assert convrecords.listener_for(ev, ours, {}, lambda p, a, port: True, sent) == ("ext", 45678)
    assert convrecords.listener_for(ev, ours, defaults, lambda p, a, port: False, None) == ("tcp-echo", 1337)
    assert convrecords.listener_for(ev, ours, defaults, lambda p, a, port: True, None) == ("ext", 45678)


def test_diverted_reads_the_reply_port_on_the_kernel_path_and_the_queued_mark_on_the_queue_path():
    ev = parse(tcp_destroy(7))
    redirected = CtEvent(**{**ev.__dict__, "reply_src_port": 1337})
    assert convrecords.diverted(redirected, 0x400000, kernel_path=True) is True
    assert convrecords.diverted(ev, 0x400000, kernel_path=True) is False
    queued = CtEvent(**{**ev.__dict__, "mark": ev.mark | 0x400000})
    assert convrecords.diverted(queued, 0x400000, kernel_path=False) is True
    assert convrecords.diverted(ev, 0x400000, kernel_path=False) is False
    local = CtEvent(**{**ev.__dict__, "reply_src": ipaddress.ip_address("127.0.0.1").packed})
    assert convrecords.diverted(local, 0x400000, kernel_path=False) is None  # NEW came before divert_unbound


def test_ipv6_endpoints_are_bracketed():
    assert convrecords.endpoint(ipaddress.ip_address("2001:db8::53").packed, 53) == "[2001:db8::53]:53"
    assert convrecords.endpoint(ipaddress.ip_address("2001:db8::53").packed, None) == "2001:db8::53"


def test_profile_and_task_follow_the_client_and_none_removes_them():
    rec = {"event": "start", "client": "192.0.2.2:40000", "client_address": "192.0.2.2", "listener": "tcp-echo"}
    both = convrecords.with_task(convrecords.with_profile(rec, "sinkhole"), "t1")
    assert list(both) == ["event", "client", "client_address", "task", "profile", "listener"]
    assert convrecords.with_profile(both, None) == convrecords.with_task(rec, "t1")
    assert convrecords.with_profile(rec, None) is rec
