"""Fuzz FixUp: garbage never raises, and a rewrite only ever touches the port
being rewritten and the L4 checksum (keeping a valid checksum valid)."""
from __future__ import annotations

import random
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import (V4_CLIENT, V4_LOCAL, V6_CLIENT, V6_LOCAL, checksum_offset, checksum_valid, differing_offsets,
                      packet)
from nftdivert.worker import decide as decide_mod
from nftdivert.worker.conversations import ConversationTable
from nftdivert.worker.fixup import DROP, Counters, FixUp
from nftdivert.worker.packet import ACK, FIN, SYN, TCP, UDP, Segment, parse

LISTEN = {TCP: 1337, UDP: 1338}
ADDRS = {4: (V4_CLIENT, V4_LOCAL), 6: (V6_CLIENT, V6_LOCAL)}


def make():
    table = ConversationTable(max_entries=64, tcp_idle=60.0, udp_idle=10.0, close_grace=2.0)
    decide = partial(
        decide_mod.decide, listeners=LISTEN, is_bound=lambda p, addr, port: port == 22, left_alone=lambda p, port: False
    )
    return FixUp(table, decide, Counters())


def corpus():
    """(direction, packet) pairs of a few diverted conversations."""
    out = []
    for version, (client, local) in ADDRS.items():
        for protocol in (TCP, UDP):
            for i, size in enumerate((0, 1, 17, 600, 1460)):
                cport, port = 40000 + i, 80 + i
                payload = bytes(random.Random(size).randrange(256) for _ in range(size))
                opener = SYN if protocol == TCP else 0
                out.append(("in", packet(version, protocol, client, local, cport, port, flags=opener)))
                out.append(("in", packet(version, protocol, client, local, cport, port, payload, flags=ACK)))
                out.append(("out", packet(version, protocol, local, client, LISTEN[protocol], cport, payload, flags=ACK)))
                out.append(("in", packet(version, protocol, client, local, cport, port, flags=FIN | ACK)))
    return out


CORPUS = corpus()


def primed():
    f = make()
    for direction, data in CORPUS:
        if direction == "in" and parse(data).starts_conversation:
            f.incoming(data, 0.0)
    return f


def check(f: FixUp, direction: str, data: bytes, now: float):
    errors = f.counters.errors
    result = (f.incoming if direction == "in" else f.outgoing)(data, now)
    assert f.counters.errors == errors, repr(f.last_error)
    if result is None:
        return None
    if result is DROP:  # only a truncated copy is refused outright
        assert getattr(parse(data), "reason", None) == "truncated"
        return result
    assert isinstance(result, bytes) and len(result) == len(data)
    seg = parse(data)
    assert isinstance(seg, Segment)
    # Both port fields may change (a clashing client port gets an alias), the checksum with them.
    allowed = set(range(seg.l4_offset, seg.l4_offset + 4)) | {checksum_offset(seg), checksum_offset(seg) + 1}
    assert differing_offsets(data, result) <= allowed
    if checksum_valid(data):
        assert checksum_valid(result)
    after = parse(result)
    if direction == "in":
        assert after.dport == LISTEN[seg.protocol]
    else:
        assert seg.sport == LISTEN[seg.protocol]
    return result


def mutate(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(6)
    b = bytearray(data)
    if kind == 0:  # a truncated copy
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:  # a few flipped bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # flipped bits in the headers, where parse decides
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(min(len(b), 64))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 3:  # inserted or deleted bytes
        i = rng.randrange(len(b) + 1)
        if rng.random() < 0.5:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del b[i : i + rng.randint(1, 4)]
        return bytes(b)
    if kind == 4:  # random bytes behind a plausible first byte
        return bytes([rng.choice((0x45, 0x46, 0x60, 0x4F))]) + rng.randbytes(rng.randrange(80))
    return rng.randbytes(rng.randrange(100))


def test_no_truncated_copy_is_rewritten():
    """A prefix is passed unchanged, or dropped if it is a truncated copy of a
    diverted packet (one that would reach the wrong port, or the client unrestored)."""
    f = primed()
    before = f.counters.rewritten
    for direction, data in CORPUS:
        for cut in range(0, len(data), 7 if len(data) > 200 else 1):
            fn = f.incoming if direction == "in" else f.outgoing
            assert fn(data[:cut], 1.0) in (None, DROP)
    assert f.counters.errors == 0 and f.counters.rewritten == before
    assert f.counters.dropped > 0


def test_corpus_itself_is_rewritten():
    f = primed()
    rewritten = 0
    for direction, data in CORPUS:
        rewritten += check(f, direction, data, 1.0) is not None
    assert rewritten == len(CORPUS)


def test_mutated_packets():
    rng = random.Random(20240601)
    f = primed()
    for i in range(6000):
        direction, data = rng.choice(CORPUS)
        if rng.random() < 0.1:
            direction = "out" if direction == "in" else "in"
        check(f, direction, mutate(rng, data), i / 100)
        if i % 500 == 0:
            f.table.expire(i / 100)
    c = f.counters
    assert c.errors == 0
    assert c.seen == c.rewritten + c.passed + c.malformed + c.dropped
    assert c.rewritten > 100 and c.malformed > 1000  # the fuzz reached both paths


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(CORPUS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=6),
    st.one_of(st.none(), st.integers(0, 2000)),
)
def test_hypothesis_mutations(item, flips, cut):
    direction, data = item
    b = bytearray(data)
    for at, mask in flips:
        b[at % len(b)] ^= mask
    if cut is not None:
        del b[cut:]
    check(primed(), direction, bytes(b), 1.0)


@given(st.binary(max_size=120), st.sampled_from(("in", "out")))
def test_arbitrary_bytes(data, direction):
    check(make(), direction, data, 0.0)
