"""The DNS listener's answers and its address pool: real DNS messages built and parsed by dnspython."""

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nftdivert.config import Config, DnsConfig, from_mapping
from nftdivert.services.dns import Resolver
from nftdivert.services.names import AnswerPool, NameHistory
from nftdivert.errors import ConfigError


def pool(net="203.0.113.0/29", max_names=None, assigned=None):
    return keyed(net, "", max_names, assigned)


def keyed(net="198.18.0.0/15", key="fleet-1", max_names=131072, assigned=None):
    on_assign = (lambda *a: assigned.append((str(a[0]), a[1], a[2]))) if assigned is not None else None
    return AnswerPool(ipaddress.ip_network(net), max_names, on_assign, key)


def resolver(v4="198.51.100.0/24", v6="2001:db8:53::/64", seen=None, **kw):
    return Resolver(AnswerPool(ipaddress.ip_network(v4)), AnswerPool(ipaddress.ip_network(v6)), ttl=60,
                    on_question=(lambda *q: seen.append(q)) if seen is not None else None, **kw)


def ask(res, name, qtype):
    query = dns.message.make_query(name, qtype, use_edns=0)  # as dig asks
    return dns.message.from_wire(res.answer(query.to_wire(), "192.0.2.2:5353")), query


def texts(reply):
    return [rd.to_text() for rrset in reply.answer for rd in rrset]


# ---- the pool --------------------------------------------------------------------

def test_addresses_in_order_of_first_question_skipping_network_and_broadcast():
    p = pool("203.0.113.0/29")  # .1 to .6
    assert p.capacity == 6
    assert [str(p.address_for(f"n{i}.example")) for i in range(6)] == [f"203.0.113.{i}" for i in range(1, 7)]
    assert str(p.address_for("N3.Example.")) == "203.0.113.4"  # case and final dot do not matter


def test_full_pool_recycles_the_least_recently_asked_name_and_reports_it():
    assigned = []
    p = pool("203.0.113.0/29", assigned=assigned)
    for i in range(6):
        p.address_for(f"n{i}.example")
    p.address_for("n0.example")  # asked again: now the most recent
    p.address_for("n2.example")
    assigned.clear()
    assert str(p.address_for("new1.example")) == "203.0.113.2"  # n1: least recently asked
    assert str(p.address_for("new2.example")) == "203.0.113.4"  # then n3
    assert assigned == [("203.0.113.2", "new1.example", "n1.example"),
                        ("203.0.113.4", "new2.example", "n3.example")]
    assert p.name_for(ipaddress.ip_address("203.0.113.2")) == "new1.example"
    # The old name comes back: it is a new name now, and takes the next least recent address.
    assert str(p.address_for("n1.example")) == "203.0.113.5"
    assert assigned[-1] == ("203.0.113.5", "n1.example", "n4.example")
    assert len(p) == 6


def test_first_assignments_report_no_old_name():
    assigned = []
    p = pool(assigned=assigned)
    p.address_for("a.example")
    p.address_for("a.example")  # known: no new assignment
    assert assigned == [("203.0.113.1", "a.example", None)]


def test_max_names_caps_a_huge_pool_without_spelling_it_out():
    p = pool("2001:db8:53::/64", max_names=3)
    assert p.capacity == 3
    got = [p.address_for(f"n{i}.example") for i in range(4)]
    assert [str(a) for a in got] == ["2001:db8:53::1", "2001:db8:53::2", "2001:db8:53::3", "2001:db8:53::1"]
    assert p.name_for(ipaddress.ip_address("2001:db8:53::1")) == "n3.example"
    assert p.name_for(ipaddress.ip_address("2001:db8:53::4")) is None


def test_the_default_pools_are_big_and_cost_nothing_until_asked():
    v4 = AnswerPool(DnsConfig().pools()[0], DnsConfig().max_names)
    assert v4.capacity == 131070 and len(v4) == 0
    assert str(v4.address_for("dga.example")) == "198.18.0.1"
    assert v4.name_for(ipaddress.ip_address("198.19.255.254")) is None
    assert v4.name_for(ipaddress.ip_address("198.51.100.9")) is None  # outside the pool
    assert v4.name_for(ipaddress.ip_address("2001:db8:53::1")) is None


def test_a_pool_of_one_moves_its_address_to_each_new_name():
    assigned = []
    p = pool("203.0.113.5/32", assigned=assigned)
    assert [str(p.address_for(n)) for n in ("x.example", "y.example")] == ["203.0.113.5"] * 2
    assert assigned[-1] == ("203.0.113.5", "y.example", "x.example")
    assert p.name_for(ipaddress.ip_address("203.0.113.5")) == "y.example"


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(0, 30), max_size=200),
       st.sampled_from(["", "fleet"]), st.sampled_from(["10.0.0.0/8", "203.0.113.0/28", "203.0.113.0/30"]))
def test_one_name_per_address_and_lru_order_under_any_sequence(size, asked, key, net):
    """Against a plain model: one name per address at any time, the names kept
    are the most recently asked (as many as the pool holds), and each name
    keeps its address while kept. Without a key, a full pool gives the least
    recently asked name's address to the new one and reports it."""
    assigned = []
    p = keyed(net, key=key, max_names=size, assigned=assigned)
    recent: list[str] = []  # the model: least recently asked first
    held: dict[str, str] = {}
    for n in asked:
        name = f"n{n}.example"
        address = str(p.address_for(name))
        if name in held:
            assert held[name] == address
        recent = [r for r in recent if r != name] + [name]
        if len(recent) > p.capacity:
            gone = recent.pop(0)
            was = held.pop(gone)
            if not key:
                assert assigned[-1] == (address, name, gone) and was == address
        held[name] = address
        assert len(set(held.values())) == len(held)  # no address stands for two names
        for kept, addr in held.items():
            assert p.name_for(ipaddress.ip_address(addr)) == kept
    assert len(p) == len(recent) <= p.capacity


# ---- a keyed pool: a fleet of gateways agrees ----------------------------------------

def test_pools_with_the_same_key_give_every_name_the_same_address():
    names = [f"host{i}.dga.example" for i in range(1000)]
    one, two = keyed(), keyed()
    first = {n: str(one.address_for(n)) for n in names}
    assert {n: str(two.address_for(n)) for n in names} == first
    assert len(set(first.values())) == 1000
    # Each name's own address, as a fresh pool gives it. Among 1,000 names in a /15 a few pairs
    # share one; the name asked first keeps it, the other takes its next candidate. So only those
    # may differ between gateways that were asked in another order.
    own = {n: str(keyed().address_for(n)) for n in names}
    shared = {n for n in names if list(own.values()).count(own[n]) > 1}
    assert 0 < len(shared) < 20
    assert {n for n in names if first[n] != own[n]} < shared
    third = keyed()
    reverse = {n: str(third.address_for(n)) for n in reversed(names)}
    assert len(set(reverse.values())) == 1000
    assert {n for n in names if reverse[n] != own[n]} < shared
    v6 = [str(keyed("2001:db8:53::/64").address_for(n)) for n in names[:50]]
    assert v6 == [str(keyed("2001:db8:53::/64").address_for(n)) for n in names[:50]]
    other = keyed(key="fleet-2")
    assert sum(first[n] == str(other.address_for(n)) for n in names) < 5  # another key: other addresses
    assert str(pool("198.18.0.0/15").address_for(names[0])) == "198.18.0.1"  # no key: in order, as before


def test_colliding_names_never_share_an_address_and_the_pool_fills_up():
    """/29: six addresses for six names, so the keyed names collide: each takes another candidate."""
    assigned = []
    p = keyed("203.0.113.0/29", assigned=assigned)
    got = {f"n{i}.example": str(p.address_for(f"n{i}.example")) for i in range(6)}
    assert sorted(got.values()) == [f"203.0.113.{i}" for i in range(1, 7)]
    assert all(old is None for _, _, old in assigned)
    for name, address in got.items():
        assert p.name_for(ipaddress.ip_address(address)) == name
    # Full: the least recently asked name's address goes to the new one, and the log hears of it.
    assert str(p.address_for("new.example")) == got["n0.example"]
    assert assigned[-1] == (got["n0.example"], "new.example", "n0.example")


def test_a_keyed_pool_larger_than_max_names_reports_each_address_that_changes_hands():
    """The new name takes its own address; the freed one's next taker is reported as a recycling
    (the pool remembers as many freed addresses as it holds names, the most recently freed)."""
    assigned = []
    p = keyed("203.0.113.0/28", max_names=4, assigned=assigned)
    owner: dict[str, str] = {}  # address -> the last name it stood for
    for i in range(200):
        address = str(p.address_for(f"n{i}.example"))
        assert assigned[-1][2] in (None, owner.get(address))
        owner[address] = f"n{i}.example"
        assert len(p) == min(i + 1, 4) and len(p._former) <= 4
    assert sum(old is not None for _, _, old in assigned) > 50


def test_name_history_answers_for_the_time_asked():
    h = NameHistory()
    a = ipaddress.ip_address("198.18.0.1")
    h.assign(a, "old.example", since=100.0)
    h.assign(a, "new.example", since=200.0)
    assert h.name_at(a, 150.0) == "old.example"
    assert h.name_at(a, 200.0) == h.name_at(a, 250.0) == h.name_at(a) == "new.example"
    assert h.name_at(a, 50.0) is None  # a literal address used before any name had it
    for i in range(10):
        h.assign(a, f"n{i}.example", since=300.0 + i)
    assert h.name_at(a, 150.0) is None  # too far back to remember: no name rather than a wrong one


# ---- answers ---------------------------------------------------------------------

def test_name_history_forgets_the_least_recently_assigned_address_beyond_its_bound():
    h = NameHistory(max_addresses=3)
    addresses = [ipaddress.ip_address(f"198.18.0.{i}") for i in range(1, 5)]
    for i, a in enumerate(addresses[:3]):
        h.assign(a, f"n{i}.example", since=float(i))
    h.assign(addresses[0], "again.example", since=10.0)  # assigned again: now the most recent
    h.assign(addresses[3], "n3.example", since=11.0)
    assert h.name_at(addresses[1]) is None
    assert [h.name_at(a) for a in (addresses[0], addresses[2], addresses[3])] == \
        ["again.example", "n2.example", "n3.example"]


@pytest.mark.parametrize("qtype, first", [("A", "198.51.100.1"), ("AAAA", "2001:db8:53::1")])
def test_every_name_gets_an_address_from_the_pool(qtype, first):
    res = resolver()
    reply, query = ask(res, "malware-c2.example.", qtype)
    assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    assert texts(reply) == [first]
    assert reply.answer[0].ttl == 60
    assert reply.flags & dns.flags.RA  # a recursive resolver's answer, as a stub expects
    assert reply.payload == 1232  # what resolvers advertise (dnspython's own 8192 would stand out)


def test_names_get_distinct_stable_addresses_and_map_back():
    res = resolver()
    a = ask(res, "a.example", "A")[0].answer[0][0].address
    b = ask(res, "b.example", "A")[0].answer[0][0].address
    again = ask(res, "A.EXAMPLE.", "A")[0].answer[0][0].address
    assert a != b and a == again
    assert res.name_for(ipaddress.ip_address(b)) == "b.example"
    assert res.name_for(ipaddress.ip_address("198.51.100.200")) is None


def test_ptr_answers_a_pool_address_with_its_current_name():
    res = resolver(v4="203.0.113.0/30")  # .1 and .2
    ask(res, "one.example", "A")
    ask(res, "two.example", "A")
    ask(res, "three.example", "A")  # recycles .1
    v6 = ask(res, "six.example", "AAAA")[0].answer[0][0].address
    for address, name in (("203.0.113.1", "three.example."), ("203.0.113.2", "two.example."), (v6, "six.example.")):
        reply, _ = ask(res, dns.reversename.from_address(address), "PTR")
        assert reply.rcode() == dns.rcode.NOERROR and texts(reply) == [name]


@pytest.mark.parametrize("name", [
    dns.reversename.from_address("198.51.100.77"),  # in the pool, never handed out
    dns.reversename.from_address("192.0.2.1"),  # not a pool address
    dns.reversename.from_address("2001:db8:1::2"),
    "100.51.198.in-addr.arpa.",  # not a whole address
    "host.example.",  # not a reverse name at all
])
def test_any_other_ptr_is_nxdomain(name):
    seen = []
    reply, _ = ask(resolver(seen=seen), name, "PTR")
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.answer == []
    assert seen[0][3:] == ("", "NXDOMAIN", None)


def test_names_on_the_nxdomain_list_do_not_exist_for_any_type():
    seen = []
    res = resolver(seen=seen, nxdomain=("*.blocked.example", "exact.example"))
    for name in ("x.blocked.example", "a.b.BLOCKED.example.", "exact.example"):
        for qtype in ("A", "AAAA", "MX", "TXT"):
            reply, _ = ask(res, name, qtype)
            assert reply.rcode() == dns.rcode.NXDOMAIN and reply.answer == [], (name, qtype)
    assert len(res.v4) == 0 and len(res.v6) == 0  # no address spent on them
    for name in ("blocked.example", "sub.exact.example", "notblocked.example"):  # "*." is below only
        assert ask(res, name, "A")[0].rcode() == dns.rcode.NOERROR, name
    assert seen[0] == ("192.0.2.2:5353", "x.blocked.example", "A", "", "NXDOMAIN", None)


def test_mx_and_ns_point_at_names_that_resolve_into_the_pool():
    res = resolver()
    mx, _ = ask(res, "corp.example", "MX")
    assert texts(mx) == ["10 mail.corp.example."]
    ns, _ = ask(res, "corp.example", "NS")
    assert sorted(texts(ns)) == ["ns1.corp.example.", "ns2.corp.example."]
    target = ask(res, "mail.corp.example", "A")[0].answer[0][0].address
    assert ipaddress.ip_address(target) in ipaddress.ip_network("198.51.100.0/24")


def test_soa_txt_and_cname_are_plausible():
    res = resolver(txt="google-site-verification=abc", serial=2024050101)
    soa, _ = ask(res, "corp.example", "SOA")
    assert texts(soa) == ["ns1.corp.example. hostmaster.corp.example. 2024050101 7200 3600 1209600 60"]
    txt, _ = ask(res, "corp.example", "TXT")
    assert texts(txt) == ['"google-site-verification=abc"']
    cname, _ = ask(res, "www.corp.example", "CNAME")  # canonical: its own addresses
    assert texts(cname) == ["198.51.100.1", "2001:db8:53::1"]
    assert texts(ask(resolver(), "corp.example", "TXT")[0]) == ['"v=spf1 -all"']


def test_a_target_too_long_for_dns_is_the_name_itself():
    long_name = ".".join(["a" * 63] * 3) + "." + "b" * 61 + "."  # 253 characters: no room for "mail."
    assert texts(ask(resolver(), long_name, "MX")[0]) == [f"10 {long_name}"]


def test_other_types_get_an_empty_noerror_and_everything_is_logged():
    seen = []
    res = resolver(seen=seen)
    reply, _ = ask(res, "host.example", "HINFO")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
    ask(res, "web.example", "A")
    ask(res, "corp.example", "MX")
    assert seen == [("192.0.2.2:5353", "host.example", "HINFO", "", "NOERROR", None),
                    ("192.0.2.2:5353", "web.example", "A", "198.51.100.1", "NOERROR", None),
                    ("192.0.2.2:5353", "corp.example", "MX", "10 mail.corp.example", "NOERROR", None)]


def test_nothing_in_any_answer_names_nftdivert():
    res = Resolver.from_config(DnsConfig())
    for qtype in ("A", "AAAA", "MX", "NS", "SOA", "TXT", "CNAME", "PTR", "HINFO"):
        query = dns.message.make_query("probe.example", qtype)
        assert b"nftdivert" not in res.answer(query.to_wire()).lower()


@pytest.mark.parametrize("junk", [b"", b"\x00", b"not dns at all", bytes(12), b"\xff" * 40])
def test_garbage_gets_no_answer_and_no_exception(junk):
    reply = resolver().answer(junk)
    if reply is not None:  # a parseable header with no question: answered empty
        assert dns.message.from_wire(reply).answer == []


# ---- the [dns] config -------------------------------------------------------------

def test_dns_config_defaults_and_good_values():
    cfg = from_mapping({"dns": {"answer_v4": "203.0.113.0/24", "max_names": 1000, "txt": "",
                                "nxdomain": ["*.blocked.example", "exact.example.", "_dmarc.x-y.example"]}})
    assert cfg.dns.nxdomain == ("*.blocked.example", "exact.example.", "_dmarc.x-y.example")
    assert cfg.dns.max_names == 1000 and cfg.dns.txt == ""
    default = Config().dns
    assert (default.answer_v4, default.answer_v6, default.max_names) == ("198.18.0.0/15", "2001:db8:53::/64", 131072)


@pytest.mark.parametrize("section, key, reason", [
    ({"nxdomain": "*.x.example"}, "dns.nxdomain", "a list"),
    ({"nxdomain": [5]}, "dns.nxdomain[0]", "not int"),
    ({"nxdomain": ["ok.example", "x.*.example"]}, "dns.nxdomain[1]", "wildcard only as the whole first label"),
    ({"nxdomain": ["*"]}, "dns.nxdomain[0]", "wildcard"),
    ({"nxdomain": ["*x.example"]}, "dns.nxdomain[0]", "wildcard"),
    ({"nxdomain": ["a..example"]}, "dns.nxdomain[0]", "not a DNS name"),
    ({"nxdomain": [""]}, "dns.nxdomain[0]", "not a DNS name"),
    ({"nxdomain": ["a b.example"]}, "dns.nxdomain[0]", "not a DNS name"),
    ({"nxdomain": ["-a.example"]}, "dns.nxdomain[0]", "not a DNS name"),
    ({"nxdomain": ["a" * 64 + ".example"]}, "dns.nxdomain[0]", "not a DNS name"),
    ({"nxdomain": [".".join(["a" * 60] * 5)]}, "dns.nxdomain[0]", "at most 253"),
    ({"max_names": 0}, "dns.max_names", "1-4194304"),
    ({"max_names": True}, "dns.max_names", "boolean"),
    ({"txt": 5}, "dns.txt", "not int"),
    ({"pool_key": 5}, "dns.pool_key", "not int"),
    ({"pool_key": "k" * 257}, "dns.pool_key", "256 bytes"),
    ({"txt": "x" * 256}, "dns.txt", "255 bytes"),
    ({"answer_v4": "2001:db8::/64"}, "dns.answer_v4", "IPv4"),
    ({"colour": "red"}, "dns.colour", "unknown key"),
])
def test_bad_dns_config_names_the_key(section, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"dns": section})
    assert info.value.key == key
    assert reason in str(info.value)


# ---- answers the analyst sets ------------------------------------------------------


def fixed(*records, **kw):
    from nftdivert.config import DnsRecord

    assigned = []
    res = resolver(records=[DnsRecord(*r) for r in records],
                   on_assign=lambda address, name, old: assigned.append((str(address), name, old)), **kw)
    return res, assigned


def test_fixed_records_of_each_type_answer_before_the_pool():
    res, assigned = fixed(("c2.example", "A", "192.0.2.10"), ("c2.example", "AAAA", "2001:db8::10"),
                          ("*.cdn.example", "CNAME", "c2.example"), ("c2.example", "MX", "5 mx.example"),
                          ("c2.example", "TXT", "key=abc"), ("10.2.0.192.in-addr.arpa", "PTR", "c2.example"))
    assert texts(ask(res, "c2.example", "A")[0]) == ["192.0.2.10"]
    assert texts(ask(res, "c2.example", "AAAA")[0]) == ["2001:db8::10"]
    assert texts(ask(res, "c2.example", "MX")[0]) == ["5 mx.example."]
    assert texts(ask(res, "c2.example", "TXT")[0]) == ['"key=abc"']
    assert texts(ask(res, "10.2.0.192.in-addr.arpa", "PTR")[0]) == ["c2.example."]
    assert texts(ask(res, "img.cdn.example", "A")[0]) == ["c2.example.", "192.0.2.10"]  # the alias, then its address
    assert texts(ask(res, "other.example", "A")[0]) == ["198.51.100.1"]  # the pool for the rest
    assert ("192.0.2.10", "c2.example", None) in assigned and res.name_for(ipaddress.ip_address("192.0.2.10")) == \
        "c2.example"


def test_self_is_the_address_the_question_came_to():
    res, assigned = fixed(("gw.example", "A", "self"))
    query = dns.message.make_query("gw.example", "A", use_edns=0)
    reply = dns.message.from_wire(res.answer(query.to_wire(), "192.0.2.2:5353", "::ffff:192.0.2.1"))
    assert texts(reply) == ["192.0.2.1"] and assigned == [("192.0.2.1", "gw.example", None)]


def test_one_address_answers_every_name_and_the_address_stands_for_the_last_asked():
    res, assigned = fixed(one_address="192.0.2.1")
    assert texts(ask(res, "a.example", "A")[0]) == ["192.0.2.1"]
    assert texts(ask(res, "b.example", "A")[0]) == ["192.0.2.1"]
    assert texts(ask(res, "b.example", "AAAA")[0]) == []
    assert [a[1] for a in assigned] == ["a.example", "b.example"]
    assert res.name_for(ipaddress.ip_address("192.0.2.1")) == "b.example"


@pytest.mark.parametrize("records, key, reason", [
    ([{"name": "c2.example", "type": "SRV", "value": "x"}], "dns.records[0].type", "one of"),
    ([{"name": "c2.example", "type": "A", "value": "2001:db8::1"}], "dns.records[0].value", "IPv4"),
    ([{"name": "c2.example", "type": "MX", "value": "mail.example"}], "dns.records[0].value", "preference"),
    ([{"name": "c2.example", "type": "A"}], "dns.records[0].value", "missing"),
    ([{"name": "c2.example", "type": "A", "value": "self", "ttl": 1}], "dns.records[0].ttl", "unknown key"),
])
def test_bad_fixed_records_name_the_key(records, key, reason):
    with pytest.raises(ConfigError) as info:
        from_mapping({"dns": {"records": records}})
    assert info.value.key == key and reason in info.value.reason


def test_bad_one_address_names_the_key():
    with pytest.raises(ConfigError) as info:
        from_mapping({"dns": {"one_address": "gateway"}})
    assert info.value.key == "dns.one_address" and info.value.reason == "not an IP address"
