"""The bench's echo payloads are echoed: no protocol recognizer claims them.

A connection whose 16 random bytes began like a SOCKS5 greeting got a proxy's
answer, not its echo, and the bench failed on a row, the kernel's own
included. Pure: the recognizer and the bench's payload function, no kernel.
"""

from __future__ import annotations

import random
import sys

import harness
from nftdivert.services import recognize

sys.path.insert(0, str(harness.REPO / "bench"))

import load  # noqa: E402


def test_random_bytes_can_look_like_a_socks5_greeting():
    """Why the payload is not random bytes: version 5 and 14 methods, exactly what follows."""
    first = b"\x05\x0e" + bytes(range(14))
    assert recognize.choose(first, 23006) == "socks5"


def test_every_bench_payload_is_answered_with_its_echo_at_once():
    rng = random.Random(1)
    for _ in range(100_000):
        payload = load.echo_payload(rng)
        assert len(payload) == 16
        port = rng.randint(1, 65535)
        if port in load.NOT_ECHOED:
            continue
        assert recognize.choose(payload, port) == "other", payload
        assert not recognize.wants_more(payload), payload
