"""The DNS listener's answers: real DNS messages built and parsed by dnspython."""

import ipaddress

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from nftdivert.dns import AnswerPool, Resolver


def resolver(v4="198.51.100.0/24", v6="2001:db8:53::/64", seen=None):
    return Resolver(AnswerPool(ipaddress.ip_network(v4)), AnswerPool(ipaddress.ip_network(v6)), ttl=60,
                    on_question=(lambda *q: seen.append(q)) if seen is not None else None)


def ask(res, name, qtype):
    query = dns.message.make_query(name, qtype)
    return dns.message.from_wire(res.answer(query.to_wire(), "192.0.2.2:5353")), query


@pytest.mark.parametrize("qtype, first", [("A", "198.51.100.1"), ("AAAA", "2001:db8:53::1")])
def test_every_name_gets_an_address_from_the_pool(qtype, first):
    res = resolver()
    reply, query = ask(res, "malware-c2.example.", qtype)
    assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    assert [str(r) for r in reply.answer[0]] == [first]
    assert reply.answer[0].ttl == 60


def test_names_get_distinct_stable_addresses_and_map_back():
    res = resolver()
    a = ask(res, "a.example", "A")[0].answer[0][0].address
    b = ask(res, "b.example", "A")[0].answer[0][0].address
    again = ask(res, "A.EXAMPLE.", "A")[0].answer[0][0].address
    assert a != b and a == again
    assert res.name_for(ipaddress.ip_address(b)) == "b.example"
    assert res.name_for(ipaddress.ip_address("198.51.100.200")) is None


def test_single_address_pool_answers_everything_with_it():
    res = resolver(v4="203.0.113.5/32")
    for name in ("x.example", "y.example"):
        assert str(ask(res, name, "A")[0].answer[0][0]) == "203.0.113.5"


def test_pool_wraps_when_full_and_the_newest_name_owns_the_address():
    res = resolver(v4="203.0.113.0/30")  # two usable hosts: .1 and .2
    got = [str(ask(res, f"n{i}.example", "A")[0].answer[0][0]) for i in range(3)]
    assert got == ["203.0.113.1", "203.0.113.2", "203.0.113.1"]
    assert res.name_for(ipaddress.ip_address("203.0.113.1")) == "n2.example"


def test_other_types_get_an_empty_noerror_and_everything_is_logged():
    seen = []
    res = resolver(seen=seen)
    reply, _ = ask(res, "mail.example", "MX")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
    ask(res, "web.example", "A")
    assert seen == [("192.0.2.2:5353", "mail.example", "MX", ""),
                    ("192.0.2.2:5353", "web.example", "A", "198.51.100.1")]


@pytest.mark.parametrize("junk", [b"", b"\x00", b"not dns at all", bytes(12), b"\xff" * 40])
def test_garbage_gets_no_answer_and_no_exception(junk):
    reply = resolver().answer(junk)
    if reply is not None:  # a parseable header with no question: answered empty
        assert dns.message.from_wire(reply).answer == []
