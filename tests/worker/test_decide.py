"""decide(): divert only what nothing else would answer."""
from __future__ import annotations

import pytest

from nftdivert.worker.decide import Divert, decide
from nftdivert.worker.packet import TCP, UDP

LISTENERS = {TCP: 1337, UDP: 1338}
BOUND = {(TCP, 22), (UDP, 53)}
LEFT_ALONE = {(TCP, 443)}
HERE = bytes([192, 0, 2, 1])


def run(protocol, dport, listeners=LISTENERS):
    return decide(
        protocol,
        HERE,
        dport,
        listeners=listeners,
        is_bound=lambda p, addr, port: (p, port) in BOUND,
        left_alone=lambda p, port: (p, port) in LEFT_ALONE,
    )


@pytest.mark.parametrize(
    ("protocol", "dport", "expected"),
    [
        (TCP, 80, Divert(listener_port=1337, original_port=80)),
        (UDP, 9999, Divert(listener_port=1338, original_port=9999)),
        (UDP, 22, Divert(listener_port=1338, original_port=22)),  # bound for TCP only
        (TCP, 22, None),  # bound
        (UDP, 53, None),  # bound
        (TCP, 443, None),  # left alone
        (TCP, 1337, None),  # already the listener
        (UDP, 1337, Divert(listener_port=1338, original_port=1337)),  # TCP listener's port, over UDP
    ],
)
def test_decide(protocol, dport, expected):
    assert run(protocol, dport) == expected


def test_no_listener_for_the_protocol():
    assert run(UDP, 80, listeners={TCP: 1337}) is None
    assert run(TCP, 80, listeners={}) is None


def test_callbacks_get_protocol_and_port_and_bound_is_asked_last():
    calls = []

    def left_alone(p, port):
        calls.append(("left_alone", p, port))
        return True

    def is_bound(p, addr, port):
        calls.append(("is_bound", p, addr, port))
        return False

    assert decide(TCP, HERE, 80, listeners=LISTENERS, is_bound=is_bound, left_alone=left_alone) is None
    assert calls == [("left_alone", TCP, 80)]
    calls.clear()
    decide(TCP, HERE, 80, listeners=LISTENERS, is_bound=is_bound, left_alone=lambda p, port: False)
    assert calls == [("is_bound", TCP, HERE, 80)]  # the address after NAT, for family and address


def test_divert_is_frozen():
    with pytest.raises(AttributeError):
        Divert(1, 2).listener_port = 3  # type: ignore[misc]
