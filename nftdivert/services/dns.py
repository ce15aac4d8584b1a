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

from nftdivert.config import DnsConfig, DnsRecord
from nftdivert.profiles import Profiles
from nftdivert.services.names import Address, AnswerPool, Assigned, Network, Question

class NamePatterns:
    """Values by name: exact names, or "*.zone" for everything below zone (the longest zone wins)."""

    def __init__(self, pairs: Iterable[tuple[str, object]] = ()) -> None:
        self._exact: dict[tuple[bytes, ...], list] = {}
        self._below: dict[tuple[bytes, ...], list] = {}
        for pattern, value in pairs:
            below = pattern.startswith("*.")
            labels = dns.name.from_text(pattern[2:] if below else pattern).canonicalize().labels
            (self._below if below else self._exact).setdefault(labels, []).append(value)

    def find(self, name: dns.name.Name) -> list:
        labels = name.canonicalize().labels
        if labels in self._exact:
            return self._exact[labels]
        return next((self._below[labels[i:]] for i in range(1, len(labels)) if labels[i:] in self._below), [])


class NxdomainList(NamePatterns):
    """Names that do not exist: exact names, or "*.zone" for everything below zone."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        super().__init__((p, True) for p in patterns)

    def __contains__(self, name: dns.name.Name) -> bool:
        return bool(self.find(name))


class Section:
    """What a DNS section answers, every client's or a profile's: the answers the analyst set (fixed
    records, one address for every name, names that do not exist, the TXT answer, the TTL) and the
    pools its other names' addresses come from."""

    def __init__(self, v4: AnswerPool, v6: AnswerPool, records: Iterable[DnsRecord] = (), one_address: str = "",
                 nxdomain: Iterable[str] = (), txt: str = "v=spf1 -all", ttl: int = 60) -> None:
        self.v4, self.v6 = v4, v6
        self.records = NamePatterns((r.name, r) for r in records)  # before everything else
        self.one_address = ipaddress.ip_address(one_address) if one_address else None
        self.nxdomain = NxdomainList(nxdomain)
        self.txt = txt.encode()
        self.ttl = ttl

    @classmethod
    def of(cls, config: DnsConfig, v4: AnswerPool, v6: AnswerPool) -> "Section":
        return cls(v4, v6, config.records, config.one_address, config.nxdomain, config.txt, config.ttl)


def _client_address(client: str) -> str:
    """"192.0.2.2:5353" or "[2001:db8::2]:5353" (the log's endpoints) -> the address."""
    if client.startswith("["):
        return client[1:].partition("]")[0]
    return client.partition(":")[0] if client.count(":") == 1 else client


def _child(label: bytes, name: dns.name.Name) -> dns.name.Name:
    """label.<name>, or the name itself where that would be too long for DNS."""
    try:
        return dns.name.Name((label,) + name.labels)
    except dns.name.NameTooLong:
        return name


def _address_of(value: str, local: str) -> Address | None:
    """A fixed A/AAAA value: the address, or for "self" the one the question came to (None if unknown)."""
    try:
        return ipaddress.ip_address((local if value == "self" else value).removeprefix("::ffff:"))
    except ValueError:
        return None


def _reverse(name: dns.name.Name) -> Address | None:
    try:
        return ipaddress.ip_address(dns.reversename.to_address(name))
    except (dns.exception.DNSException, ValueError):
        return None  # not a full in-addr.arpa / ip6.arpa name


class Resolver:
    """Answers a DNS query in wire format with a response in wire format (pure but for the pools).

    `v4` and `v6`: the pools of every client but a profile's that has pools of its own. Each pool
    is one network's: profiles with the same network share it (the config refuses pools that
    overlap otherwise), so an address stands for one name whichever pool gave it."""

    def __init__(self, v4: AnswerPool, v6: AnswerPool, ttl: int = 60, on_question: Question | None = None,
                 nxdomain: Iterable[str] = (), txt: str = "v=spf1 -all", serial: int | None = None,
                 records: Iterable[DnsRecord] = (), one_address: str = "", on_assign: Assigned | None = None) -> None:
        self.v4, self.v6 = v4, v6
        self.default = Section(v4, v6, records, one_address, nxdomain, txt, ttl)  # every client's, but a profile's
        self._profiles: Profiles | None = None
        self._by_profile: dict[str | None, Section] = {}
        # Every pool by its network: a reload's profiles take theirs from here (a profile renamed keeps its pool).
        self.pools: dict[Network, AnswerPool] = {v4.network: v4, v6.network: v6}
        self._every_pool = tuple(self.pools.values())  # what name_for searches (a tuple: replaced, never changed)
        # Addresses fixed answers gave, with the name last answered: the log names conversations by them too.
        self._given: dict[Address, str] = {}
        self.on_assign = on_assign
        self.on_question = on_question  # (client, name, type, answer, rcode, profile) for the log
        # A date-shaped serial (YYYYMMDDnn), as zone files have.
        self.serial = serial if serial is not None else int(time.strftime("%Y%m%d01"))

    @classmethod
    def from_config(cls, config: DnsConfig, on_question: Question | None = None,
                    on_assign: Assigned | None = None) -> "Resolver":
        """Both pools report their assignments to on_assign."""
        v4, v6 = config.pools()
        return cls(AnswerPool(v4, config.max_names, on_assign, config.pool_key),
                   AnswerPool(v6, config.max_names, on_assign, config.pool_key),
                   config.ttl, on_question, config.nxdomain, config.txt, records=config.records,
                   one_address=config.one_address, on_assign=on_assign)

    def set_answers(self, profiles: Profiles) -> None:
        """The answers the analyst set, every client's and each profile's (at start, and again on a
        reload: a pool once made stays, with its names, for the run)."""
        top = profiles.default.dns
        self.default = Section.of(top, self.v4, self.v6)
        self._by_profile = {name: Section.of(answers.dns, *self._pools_of(answers.dns, top))
                            for name, answers in profiles.answers.items()}
        self._every_pool = tuple(self.pools.values())
        self._profiles = profiles if profiles else None

    def _pools_of(self, config: DnsConfig, top: DnsConfig) -> tuple[AnswerPool, AnswerPool]:
        """A profile's pools: every client's where it has none of its own, else its networks' (made once)."""
        if config.pools() == top.pools():
            return self.v4, self.v6
        for net in config.pools():
            if net not in self.pools:
                self.pools[net] = AnswerPool(net, config.max_names, self.on_assign, config.pool_key)
        v4, v6 = (self.pools[net] for net in config.pools())
        return v4, v6

    def _section_for(self, client: str) -> tuple[str | None, Section]:
        """(the client's profile, its section); (None, every client's) outside every profile."""
        if self._profiles is None:
            return None, self.default
        profile = self._profiles.profile_for(_client_address(client)).profile
        return profile, self._by_profile.get(profile, self.default)

    def name_for(self, address: Address) -> str | None:
        """The name `address` stands for now, whichever pool gave it (the log, PTR, the other listeners ask)."""
        for pool in self._every_pool:
            name = pool.name_for(address)
            if name is not None:
                return name
        return self._given.get(address)

    def answer(self, wire: bytes, client: str = "", local: str = "") -> bytes | None:
        """`local`: the address the question came to, what a fixed answer of "self" gives."""
        try:
            query = dns.message.from_wire(wire)
        except (dns.exception.DNSException, ValueError):
            return None  # not DNS: nothing sensible to say
        # What a common recursive resolver says: RA set (dig warns when it is
        # missing), and the EDNS buffer size resolvers use since 2020.
        response = dns.message.make_response(query, recursion_available=True, our_payload=1232)
        profile, section = self._section_for(client)
        for question in query.question:
            qtype = question.rdtype
            rcode, rrsets = dns.rcode.NOERROR, []
            if question.rdclass == dns.rdataclass.IN:
                rcode, rrsets = self._records(question.name, qtype, section, local)
            if rcode != dns.rcode.NOERROR:
                response.set_rcode(rcode)
            response.answer.extend(rrsets)
            if self.on_question is not None:
                shown = ", ".join(rd.to_text(origin=dns.name.root, relativize=True) for rrset in rrsets for rd in rrset)
                self.on_question(client, question.name.to_text(omit_final_dot=True), dns.rdatatype.to_text(qtype),
                                 shown, dns.rcode.to_text(rcode), profile)
        return response.to_wire()

    def _records(self, name: dns.name.Name, qtype: int, given: Section, local: str = "",
                 depth: int = 0) -> tuple[int, list[dns.rrset.RRset]]:
        fixed = given.records.find(name)
        if fixed and depth < 8:  # a bound on CNAMEs that lead to each other
            rrsets = self._fixed(name, qtype, fixed, given, local, depth)
            if rrsets is not None:
                return dns.rcode.NOERROR, rrsets
        if name in given.nxdomain:
            return dns.rcode.NXDOMAIN, []
        if given.one_address is not None and qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            wanted = 4 if qtype == dns.rdatatype.A else 6
            if given.one_address.version != wanted:
                return dns.rcode.NOERROR, []
            return dns.rcode.NOERROR, [self._given_rrset(name, qtype, given.ttl, given.one_address)]
        if qtype == dns.rdatatype.PTR:
            address = _reverse(name)
            target = self.name_for(address) if address is not None else None
            if target is None:  # not one of ours: no waiting on an empty answer
                return dns.rcode.NXDOMAIN, []
            return dns.rcode.NOERROR, [_rrset(name, given.ttl, "PTR", target.rstrip(".") + ".")]
        if qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return dns.rcode.NOERROR, [_address(name, qtype, given)]
        if qtype == dns.rdatatype.CNAME:
            # Every name here is canonical, so there is no alias to give; the
            # addresses it stands for are what the asker goes on to need.
            return dns.rcode.NOERROR, [_address(name, t, given) for t in (dns.rdatatype.A, dns.rdatatype.AAAA)]
        if qtype == dns.rdatatype.MX:  # a target that resolves into the pool: mail goes on to connect
            return dns.rcode.NOERROR, [_rrset(name, given.ttl, "MX", f"10 {_child(b'mail', name)}")]
        if qtype == dns.rdatatype.NS:
            servers = (str(_child(b"ns1", name)), str(_child(b"ns2", name)))
            return dns.rcode.NOERROR, [_rrset(name, given.ttl, "NS", *servers)]
        if qtype == dns.rdatatype.SOA:
            soa = f"{_child(b'ns1', name)} {_child(b'hostmaster', name)} {self.serial} 7200 3600 1209600 {given.ttl}"
            return dns.rcode.NOERROR, [_rrset(name, given.ttl, "SOA", soa)]
        if qtype == dns.rdatatype.TXT:
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.TXT)
            rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [given.txt]), given.ttl)
            return dns.rcode.NOERROR, [rrset]
        return dns.rcode.NOERROR, []  # other types: the name exists, nothing more

    def _fixed(self, name: dns.name.Name, qtype: int, fixed: list[DnsRecord], given: Section, local: str,
               depth: int) -> list[dns.rrset.RRset] | None:
        """The fixed records' answer; None where none is of this type (the usual answer then)."""
        rdtype = dns.rdatatype.to_text(qtype)
        of_type = [r for r in fixed if r.type == rdtype]
        if of_type and qtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            wanted = 4 if qtype == dns.rdatatype.A else 6
            addresses = [a for r in of_type if (a := _address_of(r.value, local)) is not None and a.version == wanted]
            return [self._given_rrset(name, qtype, given.ttl, *addresses)] if addresses else []
        if of_type and qtype == dns.rdatatype.TXT:
            rrset = dns.rrset.RRset(name, dns.rdataclass.IN, dns.rdatatype.TXT)
            for r in of_type:
                rrset.add(dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [r.value.encode()]), given.ttl)
            return [rrset]
        if of_type:  # CNAME, MX, PTR: names, made absolute
            return [_rrset(name, given.ttl, rdtype, *(r.value.rstrip(".") + "." for r in of_type))]
        alias = next((r for r in fixed if r.type == "CNAME"), None)
        if alias is None:
            return None
        target = dns.name.from_text(alias.value)
        _, more = self._records(target, qtype, given, local, depth + 1)
        return [_rrset(name, given.ttl, "CNAME", str(target)), *more]

    def _given_rrset(self, name: dns.name.Name, qtype: int, ttl: int, *addresses: Address) -> dns.rrset.RRset:
        """A fixed address answer; each address now stands for this name (reported as a pool's would be)."""
        shown = name.to_text(omit_final_dot=True)
        for address in addresses:
            if self._given.get(address) != shown:
                self._given[address] = shown
                if self.on_assign is not None:
                    self.on_assign(address, shown, None)
        return _rrset(name, ttl, dns.rdatatype.to_text(qtype), *(str(a) for a in addresses))


def _address(name: dns.name.Name, qtype: int, section: Section) -> dns.rrset.RRset:
    """The name's address from the section's pool."""
    pool = section.v4 if qtype == dns.rdatatype.A else section.v6
    return _rrset(name, section.ttl, dns.rdatatype.to_text(qtype), str(pool.address_for(name.to_text())))


def _rrset(name: dns.name.Name, ttl: int, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *rdatas)
