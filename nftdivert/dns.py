"""The built-in DNS listener: every A/AAAA question gets an address that is then diverted.

Programs resolve a name before they connect; without an answer they never
get as far as a conversation. Each distinct name gets its own address from
the configured pool (a single address is a pool of one), so the
conversation log can say which name a conversation was for. Parsing and
building messages is dnspython's job, not ours.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Callable

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AnswerPool:
    """Name -> address, handed out in order of first question, stable afterwards."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self._hosts = network.num_addresses if network.prefixlen >= network.max_prefixlen - 1 else network.num_addresses - 2
        self._first = network.network_address + (0 if network.prefixlen >= network.max_prefixlen - 1 else 1)
        self._by_name: dict[str, Address] = {}
        self._by_address: dict[Address, str] = {}
        self._lock = threading.Lock()

    def address_for(self, name: str) -> Address:
        name = name.lower().rstrip(".")
        with self._lock:
            found = self._by_name.get(name)
            if found is None:
                # Wrap around when the pool runs out: the newest name wins the address.
                found = self._first + (len(self._by_name) % self._hosts)
                old = self._by_address.get(found)
                if old is not None and len(self._by_name) >= self._hosts:
                    self._by_name.pop(old, None)
                self._by_name[name] = found
                self._by_address[found] = name
            return found

    def name_for(self, address: Address) -> str | None:
        with self._lock:
            return self._by_address.get(address)


class Resolver:
    """Answers a DNS query in wire format with a response in wire format (pure but for the pools)."""

    def __init__(self, v4: AnswerPool, v6: AnswerPool, ttl: int = 60,
                 on_question: Callable[[str, str, str, str], None] | None = None) -> None:
        self.v4, self.v6, self.ttl = v4, v6, ttl
        self.on_question = on_question  # (client, name, type, answer) for the log

    def name_for(self, address: Address) -> str | None:
        pool = self.v4 if address.version == 4 else self.v6
        return pool.name_for(address)

    def answer(self, wire: bytes, client: str = "") -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None  # not DNS: nothing sensible to say
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            qtype = question.rdtype
            name = question.name.to_text()
            answer = ""
            if question.rdclass == dns.rdataclass.IN and qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                pool = self.v4 if qtype == dns.rdatatype.A else self.v6
                answer = str(pool.address_for(name))
                response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN",
                                                           dns.rdatatype.to_text(qtype), answer))
            if self.on_question is not None:
                self.on_question(client, name.rstrip("."), dns.rdatatype.to_text(qtype), answer)
        # Other types (MX, TXT, ...) get an empty NOERROR: the name exists, nothing more.
        return response.to_wire()

