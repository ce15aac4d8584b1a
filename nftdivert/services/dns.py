"""The built-in DNS listener: every name resolves, into a pool of addresses that are then diverted.

Programs resolve a name before they connect; without an answer they never
get as far as a conversation. Each name gets an address of its own from the
pool, and an address stands for exactly one name at any time, so the
conversation log can say which name a conversation was for. When the pool is
full, the least recently asked name gives its address up to the new one
(`on_assign` reports that, and the log shows it). Other record types get
plausible answers that lead back into the pool (MX -> mail.<name>, NS ->
ns1/ns2.<name>). Parsing and building messages is dnspython's job, not ours.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Iterable

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.reversename
import dns.rrset

from nftdivert.config import DnsConfig
from nftdivert.services.names import Address, AnswerPool, Assigned, Question

class NxdomainList:
    """Names that do not exist: exact names, or "*.zone" for everything below zone."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self._exact: set[tuple[bytes, ...]] = set()
        self._below: set[tuple[bytes, ...]] = set()
        for pattern in patterns:
            below = pattern.startswith("*.")
            labels = dns.name.from_text(pattern[2:] if below else pattern).canonicalize().labels
            (self._below if below else self._exact).add(labels)

    def __contains__(self, name: dns.name.Name) -> bool:
        labels = name.canonicalize().labels
        return labels in self._exact or any(labels[i:] in self._below for i in range(1, len(labels)))


def _child(label: bytes, name: dns.name.Name) -> dns.name.Name:
    """label.<name>, or the name itself where that would be too long for DNS."""
    try:
        return dns.name.Name((label,) + name.labels)
    except dns.name.NameTooLong:
        return name


def _reverse(name: dns.name.Name) -> Address | None:
    try:
        return ipaddress.ip_address(dns.reversename.to_address(name))
    except (dns.exception.DNSException, ValueError):
        return None  # not a full in-addr.arpa / ip6.arpa name


class Resolver:
    """Answers a DNS query in wire format with a response in wire format (pure but for the pools)."""

    def __init__(self, v4: AnswerPool, v6: AnswerPool, ttl: int = 60, on_question: Question | None = None,
                 nxdomain: Iterable[str] = (), txt: str = "v=spf1 -all", serial: int | None = None) -> None:
        self.v4, self.v6, self.ttl = v4, v6, ttl
        self.on_question = on_question  # (client, name, type, answer, rcode) for the log
        self.nxdomain = NxdomainList(nxdomain)
        self.txt = txt.encode()
        # A date-shaped serial (YYYYMMDDnn), as zone files have.
        self.serial = serial if serial is not None else int(time.strftime("%Y%m%d01"))

    @classmethod
    def from_config(cls, config: DnsConfig, on_question: Question | None = None,
                    on_assign: Assigned | None = None) -> "Resolver":
        """Both pools report their assignments to on_assign."""
        v4, v6 = config.pools()
        return cls(AnswerPool(v4, config.max_names, on_assign, config.pool_key),
                   AnswerPool(v6, config.max_names, on_assign, config.pool_key),
                   config.ttl, on_question, config.nxdomain, config.txt)

    def name_for(self, address: Address) -> str | None:
        pool = self.v4 if address.version == 4 else self.v6
        return pool.name_for(address)

    def answer(self, wire: bytes, client: str = "") -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None  # not DNS: nothing sensible to say
        # What a common recursive resolver says: RA set (dig warns when it is
        # missing), and the EDNS buffer size resolvers use since 2020.
        response = dns.message.make_response(query, recursion_available=True, our_payload=1232)
        for question in query.question:
            qtype = question.rdtype
            rcode, rrsets = dns.rcode.NOERROR, []
            if question.rdclass == dns.rdataclass.IN:
                rcode, rrsets = self._records(question.name, qtype)
            if rcode != dns.rcode.NOERROR:
                response.set_rcode(rcode)
            response.answer.extend(rrsets)
            if self.on_question is not None:
                shown = ", ".join(rd.to_text(origin=dns.name.root, relativize=True) for rrset in rrsets for rd in rrset)
                self.on_question(client, question.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(qtype),
                                 shown, dns.rcode.to_text(rcode))
        return response.to_wire()

    def _records(self, name: dns.name.Name, qtype: int) -> tuple[int, list[dns.rrset.RRset]]:
        if name in self.nxdomain:
            return dns.rcode.NXDOMAIN, []
        if qtype == dns.rdatatype.PTR:
            address = _reverse(name)
            target = self.name_for(address) if address is not None else None
            if target is None:  # not one of ours: no waiting on an empty answer
                return dns.rcode.NXDOMAIN, []
            return dns.rcode.NOERROR, [self._rrset(name, "PTR", target.rstrip(".") + ".")]
        if qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return dns.rcode.NOERROR, [self._address(name, qtype)]
        if qtype == dns.rdatatype.CNAME:
            # Every name here is canonical, so there is no alias to give; the
            # addresses it stands for are what the asker goes on to need.
            return dns.rcode.NOERROR, [self._address(name, dns.rdatatype.A), self._address(name, dns.rdatatype.AAAA)]
        if qtype == dns.rdatatype.MX:  # a target that resolves into the pool: mail goes on to connect
            return dns.rcode.NOERROR, [self._rrset(name, "MX", f"10 {_child(b'mail', name)}")]
        if qtype == dns.rdatatype.NS:
            return dns.rcode.NOERROR, [self._rrset(name, "NS", str(_child(b"ns1", name)), str(_child(b"ns2", name)))]
        if qtype == dns.rdatatype.SOA:
            soa = f"{_child(b'ns1', name)} {_child(b'hostmaster', name)} {self.serial} 7200 3600 1209600 {self.ttl}"
            return dns.rcode.NOERROR, [self._rrset(name, "SOA", soa)]
        if qtype == dns.rdatatype.TXT:
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.TXT)
            rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [self.txt]), self.ttl)
            return dns.rcode.NOERROR, [rrset]
        return dns.rcode.NOERROR, []  # other types: the name exists, nothing more

    def _address(self, name: dns.name.Name, qtype: int) -> dns.rrset.RRset:
        pool = self.v4 if qtype == dns.rdatatype.A else self.v6
        return self._rrset(name, dns.rdatatype.to_text(qtype), str(pool.address_for(name.to_text())))

    def _rrset(self, name: dns.name.Name, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
        return dns.rrset.from_text(name, self.ttl, "IN", rdtype, *rdatas)
