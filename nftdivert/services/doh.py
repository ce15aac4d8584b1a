"""DNS over HTTPS: the DNS query an HTTP request carries, if it carries one, and its answer.

RFC 8484: GET carries the query base64url-encoded (no padding) in `?dns=`,
POST as the body with Content-Type application/dns-message; the answer is
a DNS message. The JSON form (Google's and Cloudflare's `?name=x&type=A`,
asked with `ct=application/dns-json`, an Accept of it, or a path ending
in /resolve) gets the same answer as JSON. Either is answered by the DNS
listener's resolver, so a DoH client gets the same pool addresses, and the
same DNS records are logged, as one that asks on port 53.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse

CONTENT_TYPE = "application/dns-message"
JSON_TYPE = "application/dns-json"


def query(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes | None:
    """The DNS message in the request (RFC 8484), or None."""
    if method == "POST":
        kind = next((v for k, v in headers if k.lower() == "content-type"), "")
        return body if kind.split(";")[0].strip().lower() == CONTENT_TYPE and body else None
    if method not in ("GET", "HEAD"):
        return None
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query).get("dns")
    if not values:
        return None
    try:
        return base64.urlsafe_b64decode(values[0] + "=" * (-len(values[0]) % 4)) or None
    except (binascii.Error, ValueError):
        return None


def json_question(method: str, target: str, headers: list[tuple[str, str]]) -> tuple[str, str] | None:
    """(name, type) of a JSON DoH question, or None."""
    if method not in ("GET", "HEAD"):
        return None
    url = urllib.parse.urlsplit(target)
    params = urllib.parse.parse_qs(url.query)
    accept = next((v for k, v in headers if k.lower() == "accept"), "")
    if "name" not in params or not (JSON_TYPE in params.get("ct", []) or JSON_TYPE in accept
                                    or url.path.rstrip("/").endswith("/resolve")):
        return None
    return params["name"][0], params.get("type", ["A"])[0]


def answer(resolver, method: str, target: str, headers: list[tuple[str, str]], body: bytes,
           client: str) -> tuple[int, str, bytes] | None:
    """(status, content type, body) for a DoH request, from `resolver` (dns.Resolver); None: not DoH."""
    wire = query(method, target, headers, body)
    if wire is not None:
        reply = resolver.answer(wire, client)
        return (200, CONTENT_TYPE, reply) if reply is not None else (400, "text/plain", b"not a DNS message\n")
    asked = json_question(method, target, headers)
    if asked is None:
        return None
    import dns.exception  # dnspython: there is a resolver, so it is loaded already
    import dns.message
    import dns.rdatatype

    try:
        qtype = int(asked[1]) if asked[1].isdigit() else dns.rdatatype.from_text(asked[1])
        reply = resolver.answer(dns.message.make_query(asked[0], qtype).to_wire(), client)
    except (dns.exception.DNSException, ValueError):
        reply = None
    if reply is None:
        return 400, "application/json", b'{"Status": 1, "Comment": "a name and type that do not parse"}\n'
    return 200, JSON_TYPE, as_json(dns.message.from_wire(reply))


def as_json(message) -> bytes:
    """A DNS response (dns.message.Message) in the JSON form public resolvers answer."""
    flags = int(message.flags)
    question = [{"name": q.name.to_text(), "type": q.rdtype} for q in message.question]
    records = [{"name": rrset.name.to_text(), "type": rrset.rdtype, "TTL": rrset.ttl, "data": rd.to_text()}
               for rrset in message.answer for rd in rrset]
    return json.dumps({"Status": message.rcode(), "TC": bool(flags & 0x0200), "RD": bool(flags & 0x0100),
                       "RA": bool(flags & 0x0080), "AD": False, "CD": False, "Question": question,
                       "Answer": records}).encode() + b"\n"
