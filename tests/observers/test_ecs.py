"""Our records under Elastic Common Schema names: what ECS has a field for goes there, the rest under `nftdivert.`."""
from __future__ import annotations

import json

from nftdivert.observers.ecs import ECS_VERSION, to_ecs

END = {"v": 1, "time": "2026-11-28T04:15:00.129Z", "event": "end", "id": 2137275171, "protocol": "tcp",
       "client": "192.0.2.2:52232", "client_address": "192.0.2.2", "original_destination": "198.18.0.1:4444",
       "community_id": "1:BX1+JfT33UziOYvGpUZ9VE7vl+s=", "name": "c2.example", "listener": "tcp-echo",
       "listener_port": 1337, "interface": "to-client", "duration": 0.689,
       "sent": {"packets": 6, "bytes": 329}, "received": {"packets": 4, "bytes": 225}, "ended": "closed"}


def _leaves(value, path=""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, f"{path}.{key}".lstrip("."))
    else:
        yield path, value


def test_an_end_record_maps_onto_source_destination_network_and_event():
    ecs = to_ecs(END)
    assert ecs["@timestamp"] == END["time"] and ecs["ecs"] == {"version": ECS_VERSION}
    assert ecs["source"] == {"address": "192.0.2.2", "ip": "192.0.2.2", "port": 52232, "packets": 6, "bytes": 329}
    assert ecs["destination"] == {"address": "198.18.0.1", "ip": "198.18.0.1", "port": 4444, "domain": "c2.example",
                                  "packets": 4, "bytes": 225}
    assert ecs["network"] == {"transport": "tcp", "iana_number": "6", "community_id": END["community_id"],
                              "packets": 10, "bytes": 554, "type": "ipv4"}
    assert ecs["event"]["action"] == "end" and ecs["event"]["type"] == ["connection", "end"]
    assert ecs["event"]["duration"] == 689_000_000  # nanoseconds
    assert ecs["observer"] == {"ingress": {"interface": {"name": "to-client"}}}
    assert ecs["nftdivert"] == {"v": 1, "id": 2137275171, "listener": "tcp-echo", "listener_port": 1337,
                                "ended": "closed", "sent": END["sent"], "received": END["received"]}


def test_nothing_a_record_says_is_lost_and_ours_is_left_alone():
    kept = dict(END)
    values = {json.dumps(v) for _k, v in _leaves(to_ecs(END))}
    reshaped = ("client", "original_destination", "duration")  # split, or in nanoseconds: the test above
    lost = [k for k, v in _leaves(END) if k.split(".")[0] not in reshaped and json.dumps(v) not in values]
    assert not lost
    assert END == kept  # a pure function: the record it was given is unchanged


def test_icmpv6_an_unknown_end_and_a_process():
    ecs = to_ecs({"v": 1, "time": "t", "event": "start", "protocol": "icmpv6", "client": "2001:db8:1::2",
                  "client_address": "2001:db8:1::2", "original_destination": "2001:db8::7",
                  "icmp": {"type": 128, "code": 0, "id": 9}, "process": {"pid": 3, "host_pid": 4003,
                                                                         "command": "ping x", "uid": 0}})
    assert ecs["network"]["transport"] == "ipv6-icmp" and ecs["network"]["type"] == "ipv6"
    assert ecs["source"] == {"address": "2001:db8:1::2", "ip": "2001:db8:1::2"}  # no port
    assert ecs["process"] == {"pid": 3, "command_line": "ping x"} and ecs["user"] == {"id": "0"}
    assert ecs["nftdivert"]["process"] == {"host_pid": 4003} and ecs["nftdivert"]["icmp"]["type"] == 128
    unknown = to_ecs({**END, "duration": None, "sent": None, "received": None, "ended": "unknown"})
    assert "duration" not in unknown["event"] and "packets" not in unknown["network"]
    assert unknown["nftdivert"]["sent"] is None
    other = to_ecs({"event": "start", "protocol": "253", "client": "192.0.2.2", "original_destination": "192.0.2.9"})
    assert other["network"]["transport"] == "253" and other["network"]["iana_number"] == "253"


def test_listener_records_use_their_own_fields():
    dns = to_ecs({"v": 1, "time": "t", "event": "dns", "client": "192.0.2.2:5353", "client_address": "192.0.2.2",
                  "name": "c2.example", "type": "A", "answer": "198.18.0.1", "rcode": "NOERROR"})
    assert dns["dns"] == {"question": {"name": "c2.example", "type": "A"}, "resolved_ip": ["198.18.0.1"],
                          "response_code": "NOERROR"}
    assert "destination" not in dns  # a question's name is not the destination's
    http = to_ecs({"event": "http", "client": "192.0.2.2:40000", "original_destination": "198.18.0.1:80",
                   "method": "GET", "url": "http://c2.example/x", "status": 200, "body_size": 0})
    assert http["http"] == {"request": {"method": "GET"}, "response": {"status_code": 200}}
    assert http["url"] == {"original": "http://c2.example/x"} and http["nftdivert"]["body_size"] == 0
    tls = to_ecs({"event": "tls", "sni": "c2.example", "version": "TLSv1.3"})
    assert tls["tls"] == {"client": {"server_name": "c2.example"}} and tls["nftdivert"]["version"] == "TLSv1.3"
    assert to_ecs({"event": "admission", "client_address": "192.0.2.2", "dropped": 3})["source"] == {"ip": "192.0.2.2"}


def test_the_profile_that_answered_is_a_label():
    ecs = to_ecs({**END, "profile": "sinkhole"})
    assert ecs["labels"] == {"profile": "sinkhole"} and "profile" not in ecs["nftdivert"]
