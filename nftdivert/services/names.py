"""Which name an address stands for: the DNS listener's pool, and the history
the conversation log asks. Pure bookkeeping, apart from DNS messages (dns.py),
so the worker's side loads it without dnspython."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
from collections import OrderedDict
from typing import Callable, Iterator

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Assigned = Callable[[Address, str, str | None], None]  # address, new name, the name it had before
# client, name, type, answer, rcode, and the [[profiles]] name whose answers it got (None: the top-level ones)
Question = Callable[[str, str, str, str, str, str | None], None]


class AnswerPool:
    """Name <-> address, one name per address at any time.

    Without a key, addresses are handed out in order until the pool (or
    `max_names`) is full. With a key, a name's address derives from the name
    and the key (`candidates`), so every pool with the same key and network gives
    a name the same address, a fleet of gateways included; a name whose
    address another live name holds takes the next of its PROBES candidates.
    When the pool is full, the least recently asked name loses its address:
    without a key to the new name; with one, the new name takes its own
    address, or the freed one when all its candidates are taken (that, too,
    when every candidate is taken before the pool is full). Every step is
    O(1), and only names actually asked take memory: a /15 or a /64 is never
    spelled out.
    """

    PROBES = 16  # a keyed name's candidate addresses before it takes the least recently asked one's

    def __init__(self, network: Network, max_names: int | None = None, on_assign: Assigned | None = None,
                 key: str = "") -> None:
        self.network = network
        # The network and broadcast addresses are no one's, except in the tiniest pools.
        whole = network.prefixlen >= network.max_prefixlen - 1
        self._first = network.network_address + (0 if whole else 1)
        self.hosts = network.num_addresses - (0 if whole else 2)
        self.capacity = self.hosts if max_names is None else min(self.hosts, max_names)
        self.on_assign = on_assign
        self.key = key.encode()
        self._by_name: OrderedDict[str, int] = OrderedDict()  # least recently asked first
        self._by_offset: dict[int, str] = {}
        # Keyed: freed addresses' last names (a later name there is a recycling too), at most `capacity`.
        self._former: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_name)

    def address_for(self, name: str) -> Address:
        name = _key(name)
        with self._lock:
            offset = self._by_name.get(name)
            if offset is not None:
                self._by_name.move_to_end(name)
                return self._first + offset
            offset, old = self._place(name) if self.key else self._next(name)
            self._by_name[name] = offset
            self._by_offset[offset] = name
            address = self._first + offset
            if self.on_assign is not None:  # under the lock: reports arrive in assignment order
                self.on_assign(address, name, old)
            return address

    def _next(self, name: str) -> tuple[int, str | None]:
        if len(self._by_name) < self.capacity:
            return len(self._by_name), None  # never recycled yet: offsets 0..n-1 are taken
        old, offset = self._by_name.popitem(last=False)
        return offset, old

    def _place(self, name: str) -> tuple[int, str | None]:
        freed = None
        if len(self._by_name) >= self.capacity:
            freed = self._evict()
        for offset in candidates(self.key, name, self.hosts, self.PROBES):
            if offset not in self._by_offset:
                break
        else:
            offset = freed if freed is not None else self._evict()
        return offset, self._former.pop(offset, None)  # the name this address stood for last, if any

    def _evict(self) -> int:
        old, offset = self._by_name.popitem(last=False)
        del self._by_offset[offset]
        self._former[offset] = old
        if len(self._former) > self.capacity:
            self._former.popitem(last=False)
        return offset

    def name_for(self, address: Address) -> str | None:
        """The name this address stands for now (a peek: it does not count as use)."""
        if address.version != self.network.version:
            return None
        offset = int(address) - int(self._first)
        if not 0 <= offset < self.hosts:  # another pool's (the resolver asks each): no lock taken
            return None
        with self._lock:
            return self._by_offset.get(offset)


def candidates(key: bytes, name: str, hosts: int, count: int) -> Iterator[int]:
    """A keyed name's candidate offsets in a pool of `hosts` addresses:
    HMAC-SHA256(key, name) split in two halves h and s (big-endian), then
    (h + i * step) mod hosts for i = 0, 1, ..., where step is the first number
    from 1 + s mod (hosts - 1) on that has no factor in common with hosts
    (double hashing: names that collide once rarely collide again, and the
    first `hosts` candidates are all different, so a small pool fills up)."""
    digest = hmac.new(key, _key(name).encode(), hashlib.sha256).digest()
    start, step = int.from_bytes(digest[:16], "big"), int.from_bytes(digest[16:], "big")
    step = 1 + step % (hosts - 1) if hosts > 1 else 0
    while hosts > 1 and math.gcd(step, hosts) != 1:
        step += 1
    for i in range(count):
        yield (start + i * step) % hosts


def _key(name: str) -> str:
    return name.lower().rstrip(".") or "."


class NameHistory:
    """Address -> the names it stood for, with since when: the conversation log
    asks for the name at the time of the conversation, which may be before
    the address was recycled. A few owners per address are kept, so memory is
    bounded: at most `max_addresses`, the least recently assigned forgotten
    first (a keyed pool's addresses spread over all of it)."""

    KEEP = 4

    def __init__(self, max_addresses: int = 4 * 4_194_304) -> None:
        self._owners: OrderedDict[Address, list[tuple[float, str]]] = OrderedDict()
        self.max_addresses = max_addresses

    def assign(self, address: Address, name: str, since: float) -> None:
        owners = self._owners.setdefault(address, [])
        self._owners.move_to_end(address)
        owners.append((since, name))
        del owners[:-self.KEEP]
        if len(self._owners) > self.max_addresses:
            self._owners.popitem(last=False)

    def name_at(self, address: Address, when: float | None = None) -> str | None:
        for since, name in reversed(self._owners.get(address, ())):
            if when is None or since <= when:
                return name
        return None  # not yet handed out then (or recycled too often since to remember)
