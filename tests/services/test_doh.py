"""DNS over HTTPS (RFC 8484): the query an HTTP request carries, answered from the DNS listener's pool."""

from __future__ import annotations

import base64
import json

import dns.message
import dns.rdatatype
import pytest

import c2served
from test_listeners import http_exchange  # a request, the answer's head and body
from nftdivert.services import doh


c2 = pytest.fixture(c2served.served, name="c2")


def wire(name: str, qtype: str = "A") -> bytes:
    return dns.message.make_query(name, qtype).to_wire()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


QUERY = wire("a.example")  # one message id for every case
POST = b"POST /dns-query HTTP/1.1\r\nHost: dns.example\r\nContent-Type: application/dns-message\r\n"


@pytest.mark.parametrize("method, target, headers, body, found", [
    ("GET", "/dns-query?dns=" + b64(QUERY), [], b"", True),
    ("GET", "/resolve?ct=x&dns=" + b64(QUERY), [], b"", True),  # any path: samples pick their own
    ("POST", "/dns-query", [("Content-Type", "application/dns-message")], QUERY, True),
    ("POST", "/q", [("content-type", "Application/DNS-Message; charset=x")], QUERY, True),
    ("POST", "/dns-query", [("Content-Type", "text/plain")], QUERY, False),
    ("GET", "/dns-query?dns=!!!", [], b"", False),  # not base64url
    ("GET", "/index.html", [], b"", False),
    ("PUT", "/dns-query?dns=" + b64(QUERY), [], b"", False),
])
def test_the_query_in_a_request(method, target, headers, body, found):
    assert doh.query(method, target, headers, body) == (QUERY if found else None)


def test_get_and_post_are_answered_from_the_pool_and_logged_as_dns(c2):
    query = wire("beacon.example")
    get = f"GET /dns-query?dns={b64(query)} HTTP/1.1\r\nHost: dns.example\r\n\r\n"
    head, body = http_exchange(c2.port, get.encode())
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: application/dns-message" in head
    (answer,) = dns.message.from_wire(body).answer
    assert answer.rdtype == dns.rdatatype.A and str(answer[0]).startswith("198.18.")
    head, body = http_exchange(c2.port, POST + f"Content-Length: {len(query)}\r\n\r\n".encode() + query)
    assert str(dns.message.from_wire(body).answer[0][0]) == str(answer[0])  # the same name, the same address
    first, second = c2.of("http", 2)
    assert first["doh"] is True and second["doh"] is True and second["method"] == "POST"
    assert [(q[1], q[2], q[3]) for q in c2.questions] == [("beacon.example", "A", str(answer[0]))] * 2
    assert c2.questions[0][0] == first["client"]


def test_a_body_that_is_no_dns_message_gets_400(c2):
    head, _ = http_exchange(c2.port, POST + b"Content-Length: 3\r\n\r\nabc")
    assert head.startswith(b"HTTP/1.1 400 ") and c2.of("http")[0]["doh"] is True


@pytest.mark.parametrize("target, accept, found", [
    ("/resolve?name=c2.example&type=AAAA", "", ("c2.example", "AAAA")),  # Google's path
    ("/dns-query?name=c2.example&ct=application/dns-json", "", ("c2.example", "A")),  # the type defaults to A
    ("/dns-query?name=c2.example&type=15", "application/dns-json", ("c2.example", "15")),  # Cloudflare's Accept
    ("/dns-query?name=c2.example", "text/html", None),  # nothing says JSON: an ordinary request
    ("/resolve?type=A", "", None),  # no name
])
def test_the_json_question_in_a_request(target, accept, found):
    assert doh.json_question("GET", target, [("Accept", accept)]) == found


def test_json_questions_are_answered_from_the_pool_as_public_resolvers_answer(c2):
    head, body = http_exchange(c2.port, b"GET /resolve?name=json.example&type=AAAA HTTP/1.1\r\nHost: dns.google\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: application/dns-json" in head
    got = json.loads(body)
    assert got["Status"] == 0 and got["RA"] is True and got["Question"] == [{"name": "json.example.", "type": 28}]
    (record,) = got["Answer"]
    assert record["name"] == "json.example." and record["type"] == 28 and record["data"].startswith("2001:db8:53::")
    assert c2.questions[0][1:4] == ("json.example", "AAAA", record["data"])
    mx = json.loads(http_exchange(c2.port, b"GET /dns-query?name=json.example&type=MX&ct=application/dns-json"
                                           b" HTTP/1.1\r\nHost: cloudflare-dns.com\r\n\r\n")[1])
    assert mx["Answer"][0]["data"] == "10 mail.json.example."
    assert all(r["doh"] is True for r in c2.of("http", 2))


def test_a_json_question_that_does_not_parse_gets_400(c2):
    head, body = http_exchange(c2.port, b"GET /resolve?name=x.example&type=NOPE HTTP/1.1\r\nHost: dns.google\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["Status"] == 1
