"""DNS over HTTPS (RFC 8484): the DNS query an HTTP request carries, if it carries one.

GET carries it base64url-encoded (no padding) in `?dns=`, POST as the body
with Content-Type application/dns-message. The HTTP answer hands it to the
DNS listener's resolver, so a DoH client gets the same pool addresses, and
the same DNS records are logged, as one that asks on port 53.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

CONTENT_TYPE = "application/dns-message"


def query(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes | None:
    """The DNS message in the request, or None: an ordinary request."""
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
