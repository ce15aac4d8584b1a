"""The observer's parent: what it keeps per conversation is bounded."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from nftdivert.observers import observer_process
from nftdivert.observers.observer_process import ObserverProcess
from nftdivert.observers.summary import Summary


def _rec(event: str, i: int) -> dict:
    return {"event": event, "id": i, "protocol": "tcp", "client": "192.0.2.2:40000", "client_address": "192.0.2.2",
            "original_destination": f"198.18.0.{i}:443", "listener": "tcp-echo"}


def test_the_names_of_open_conversations_are_bounded(monkeypatch):
    monkeypatch.setattr(observer_process, "OPEN_KEPT", 4)
    parent = ObserverProcess.__new__(ObserverProcess)  # its record handling, without a child
    written: list[dict] = []
    parent._emit, parent._name_for = written.append, lambda address, when: f"n{address.packed[-1]}.example"
    parent._pools = [ipaddress.ip_network("198.18.0.0/15")]
    parent.summary, parent._open = Summary(), OrderedDict()
    for i in range(1, 11):  # a flood whose ends never come
        parent._record(0.0, _rec("start", i))
    assert len(parent._open) == 4
    parent._record(0.0, _rec("end", 10))
    parent._record(0.0, _rec("end", 1))
    assert written[-2]["name"] == "n10.example" and "name" not in written[-1]  # the oldest was forgotten


def test_a_start_and_admission_carry_the_clients_profile_then_and_an_end_its_starts():
    parent = ObserverProcess.__new__(ObserverProcess)
    written: list[dict] = []
    profiles = {"192.0.2.2": "sinkhole"}  # what a reload replaces
    parent._emit, parent._name_for, parent._pools = written.append, None, []
    parent._profile_for = lambda address, _when: profiles.get(address)
    parent.summary, parent._open = Summary(), OrderedDict()
    parent._record(0.0, _rec("start", 1))
    profiles["192.0.2.2"] = "renamed"  # a reload between the start and its end
    parent._record(0.0, _rec("start", 2))
    parent._record(0.0, _rec("end", 1))
    parent._record(0.0, {"event": "admission", "protocol": "tcp", "client_address": "192.0.2.2", "dropped": 1})
    other = dict(_rec("start", 3), client="192.0.2.3:40000", client_address="192.0.2.3")
    parent._record(0.0, other)
    assert [r.get("profile") for r in written] == ["sinkhole", "renamed", "sinkhole", "renamed", None]
    assert list(written[0])[:4] == ["event", "id", "protocol", "client"] and list(written[0])[5] == "profile"
