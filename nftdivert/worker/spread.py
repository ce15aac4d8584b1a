"""Which queue worker owns a client: the ruleset's `jhash` of the client's address.

With several workers (`queue.workers`), the ruleset sends every packet of a
client to one worker: incoming packets by their source address, replies by
their destination, so each worker sees both directions of its conversations
and no lock or table is shared. The kernel's own balancing (`queue num A-B`,
xt's `--queue-balance`) is symmetric too, but hashes with a seed it draws at
random, so nobody else could tell which worker holds a conversation. Ours is
nft's `jhash` with a fixed seed, computed here again for the listeners'
origin questions, which must reach the worker that knows the answer.

Per conversation, not per packet: a pure-Python jhash costs microseconds.
"""

from __future__ import annotations

# The ruleset's `jhash ... seed` (templates/ruleset.nft.j2 renders it from here).
SEED = 0x6E667464
_M = 0xFFFFFFFF


def _rol(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def jhash(data: bytes, seed: int) -> int:
    """Linux's jhash() (include/linux/jhash.h) of `data`, as nft_hash computes it: the
    register holds the address in network order, read as little-endian words."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + seed) & _M
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k:k + 4], "little")) & _M
        b = (b + int.from_bytes(data[k + 4:k + 8], "little")) & _M
        c = (c + int.from_bytes(data[k + 8:k + 12], "little")) & _M
        a, b, c = _mix(a, b, c)
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)  # the switch's fall-through, as zero bytes
    a = (a + int.from_bytes(tail[0:4], "little")) & _M
    b = (b + int.from_bytes(tail[4:8], "little")) & _M
    c = (c + int.from_bytes(tail[8:12], "little")) & _M
    return _final(a, b, c)


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = (a - c) & _M; a ^= _rol(c, 4); c = (c + b) & _M  # noqa: E702 - the kernel's macro, line for line
    b = (b - a) & _M; b ^= _rol(a, 6); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 8); b = (b + a) & _M  # noqa: E702
    a = (a - c) & _M; a ^= _rol(c, 16); c = (c + b) & _M  # noqa: E702
    b = (b - a) & _M; b ^= _rol(a, 19); a = (a + c) & _M  # noqa: E702
    c = (c - b) & _M; c ^= _rol(b, 4); b = (b + a) & _M  # noqa: E702
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c ^= b; c = (c - _rol(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rol(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rol(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rol(b, 24)) & _M  # noqa: E702
    return c


def worker_for(address: bytes, workers: int, seed: int = SEED) -> int:
    """The index of the worker that owns the client at `address` (4 or 16 bytes, network order):
    `jhash ip saddr mod N`, which scales the hash into [0, N) as reciprocal_scale() does."""
    if workers <= 1:
        return 0
    return (jhash(address, seed) * workers) >> 32
