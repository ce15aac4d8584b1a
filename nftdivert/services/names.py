"""Which name an address stands for: the DNS listener's pool, and the history
the conversation log asks. Pure bookkeeping, apart from DNS messages (dns.py),
so the worker's side loads it without dnspython."""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict
from typing import Callable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Assigned = Callable[[Address, str, str | None], None]  # address, new name, the name it had before
Question = Callable[[str, str, str, str, str], None]  # client, name, type, answer, rcode


class AnswerPool:
    """Name <-> address, one name per address at any time.

    Addresses are handed out in order until the pool (or `max_names`) is
    full; after that the least recently asked name loses its address to the
    new name. Both steps are O(1), and only names actually asked take memory:
    a /15 or a /64 is never spelled out.
    """

    def __init__(self, network: Network, max_names: int | None = None, on_assign: Assigned | None = None) -> None:
        self.network = network
        # The network and broadcast addresses are no one's, except in the tiniest pools.
        whole = network.prefixlen >= network.max_prefixlen - 1
        self._first = network.network_address + (0 if whole else 1)
        hosts = network.num_addresses - (0 if whole else 2)
        self.capacity = hosts if max_names is None else min(hosts, max_names)
        self.on_assign = on_assign
        self._by_name: OrderedDict[str, int] = OrderedDict()  # least recently asked first
        self._by_offset: dict[int, str] = {}
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
            old = None
            if len(self._by_name) < self.capacity:
                offset = len(self._by_name)  # never recycled yet: offsets 0..n-1 are taken
            else:
                old, offset = self._by_name.popitem(last=False)
            self._by_name[name] = offset
            self._by_offset[offset] = name
            address = self._first + offset
            if self.on_assign is not None:  # under the lock: reports arrive in assignment order
                self.on_assign(address, name, old)
            return address

    def name_for(self, address: Address) -> str | None:
        """The name this address stands for now (a peek: it does not count as use)."""
        if address.version != self.network.version:
            return None
        offset = int(address) - int(self._first)
        with self._lock:
            return self._by_offset.get(offset) if 0 <= offset < self.capacity else None


def _key(name: str) -> str:
    return name.lower().rstrip(".") or "."


class NameHistory:
    """Address -> the names it stood for, with since when: the conversation log
    asks for the name at the time of the conversation, which may be before
    the address was recycled. A few owners per address are kept, so memory is
    bounded by the pools."""

    KEEP = 4

    def __init__(self) -> None:
        self._owners: dict[Address, list[tuple[float, str]]] = {}

    def assign(self, address: Address, name: str, since: float) -> None:
        owners = self._owners.setdefault(address, [])
        owners.append((since, name))
        del owners[:-self.KEEP]

    def name_at(self, address: Address, when: float | None = None) -> str | None:
        for since, name in reversed(self._owners.get(address, ())):
            if when is None or since <= when:
                return name
        return None  # not yet handed out then (or recycled too often since to remember)
