"""The HTTP answer (plain, and inside TLS), parsed by h11.

Each request is read whole before the answer: a body by Content-Length or
chunked, with a 100 Continue for a client that waits for one. Its method,
URL, headers, body size and sha256 are logged, and the body is saved under
`[http] bodies_dir`, named by its sha256 (at most `max_body` bytes of it).
The answer: the first `[[http.rules]]` whose host and path match, else a
small valid file for the extension asked for, else the `[http]` page.

Beyond the page (`Transports`): CONNECT opens a tunnel back into the
listener (proxy.py), a WebSocket upgrade gets 101 and its frames
(websocket.py), a DNS query (RFC 8484) the DNS listener's answer (doh.py).
HTTP/2 streams (http2.py) are answered and logged by the same `respond`.
"""

from __future__ import annotations

import asyncio
import email.utils
import fnmatch
import hashlib
import os
import posixpath
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Awaitable, Callable

import h11
from http import HTTPStatus

from nftdivert.config import HttpConfig, HttpRule
from nftdivert.services import doh, payloads

READ_TIMEOUT = 30.0  # a client that stops sending mid-request is let go after this
DOH_MAX = 65535  # a DNS message is at most this long: what of a body is kept in memory for DoH


@dataclass(frozen=True)
class Transports:
    """What an answer beyond the page needs from the listener: None where it has none."""

    tunnel: Callable[[object, dict, str, int], Awaitable[None]] | None = None  # (stream, base, host, port)
    resolver: object | None = None  # dns.Resolver of the DNS listener, for DoH


def match_rule(rules: tuple[HttpRule, ...], host: str, path: str, method: str = "GET", port: int | None = None,
               query: str = "") -> HttpRule | None:
    """The first rule whose host, path, method, port and query parameters all match."""
    host, method = host.lower(), method.upper()
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    for rule in rules:
        if not (fnmatch.fnmatchcase(host, rule.host.lower()) and fnmatch.fnmatchcase(path, rule.path)
                and fnmatch.fnmatchcase(method, rule.method.upper())):
            continue
        if rule.ports and (port is None or not any(port in r for r in rule.ports)):
            continue
        if all(name in params and fnmatch.fnmatchcase(params[name], pattern) for name, pattern in rule.query):
            return rule
    return None


def answer(http: HttpConfig, host: str, target: str, method: str = "GET", port: int | None = None,
           request=None) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body for a request to `host` and `target` (path and query).

    Status 0: close without an answer (a rule's `close`). `request`: what a rule's script is given."""
    url = urllib.parse.urlsplit(target)
    path = url.path or "/"
    rule = match_rule(http.rules, host, path, method, port, url.query)
    if rule is not None:
        if rule.close:
            return 0, [], b""
        if rule.redirect:
            return 302, [("Location", rule.redirect)], b""
        if rule.script:
            status, headers, body = _scripted(rule.script, request)
        else:
            status, headers = rule.status, list(rule.headers)
            body = Path(rule.file).read_bytes() if rule.file else rule.body.encode()
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", http.content_type))
        return status, headers, body
    ext = posixpath.splitext(path)[1].lstrip(".")
    typed = payloads.by_extension(ext) if ext else None
    if typed is not None:
        return 200, [("Content-Type", typed[0])], typed[1]
    return 200, [("Content-Type", http.content_type)], http.body.encode()


def _scripted(path: str, request) -> tuple[int, list[tuple[str, str]], bytes]:
    """A rule's script's answer; its exception goes up (the conversation ends, logged)."""
    from nftdivert.services import custom

    status, headers, body = custom.script(path, "http")(request)
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError(f"http() returned status {status!r}")
    headers = list(headers.items() if isinstance(headers, dict) else headers)
    return status, [(str(k), str(v)) for k, v in headers], body.encode() if isinstance(body, str) else bytes(body)


class Body:
    """A request body as it arrives: hashed whole, saved up to the cap."""

    def __init__(self, directory: str, cap: int) -> None:
        self.size, self.saved, self._cap = 0, 0, cap if directory else 0
        self._hash = hashlib.sha256()
        self._dir = directory
        self._fd: int | None = None
        self._tmp = ""
        self.error = ""
        self.head = b""  # the first DOH_MAX bytes, in memory: a DNS query is read from it

    def add(self, data: bytes) -> None:
        if len(self.head) < DOH_MAX:
            self.head += data[:DOH_MAX - len(self.head)]
        self.size += len(data)
        self._hash.update(data)
        keep = data[:max(0, self._cap - self.saved)]
        if not keep:
            return
        try:
            if self._fd is None:
                os.makedirs(self._dir, mode=0o700, exist_ok=True)
                self._fd, self._tmp = tempfile.mkstemp(dir=self._dir, prefix=".part-")
            os.write(self._fd, keep)
            self.saved += len(keep)
        except OSError as exc:  # a full disk stops the saving, not the answer
            self.error = f"{self._dir}: {exc.strerror or exc}"
            self.abandon()
            self._cap = 0

    def finish(self) -> dict:
        info: dict = {"body_size": self.size, "body_sha256": self._hash.hexdigest()}
        if self.error:
            info["body_save_error"] = self.error
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            whole = self.saved == self.size
            path = os.path.join(self._dir, info["body_sha256"] + ("" if whole else ".part"))
            os.replace(self._tmp, path)
            info["body_saved"] = path
            if not whole:
                info["body_saved_bytes"] = self.saved
        return info

    def abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            os.unlink(self._tmp)


def respond(http: HttpConfig, transports: Transports, base: dict, method: str, host: str, target: str,
            headers: list[tuple[str, str]], body: "Body") -> tuple[int, list[tuple[str, str]], bytes, dict]:
    """The answer to a whole request (HTTP/1.1 or one HTTP/2 stream), and what its record adds."""
    dns = (doh.answer(transports.resolver, method, target, headers, body.head, base.get("client", ""))
           if transports.resolver is not None else None)
    if dns is not None:
        status, kind, content = dns
        return status, [("Content-Type", kind), ("Cache-Control", "max-age=60")], content, {"doh": True}
    original = base.get("original_destination")
    port = int(original.rpartition(":")[2]) if original else None
    url = urllib.parse.urlsplit(target)
    request = SimpleNamespace(method=method, host=_hostname(host), target=target, path=url.path or "/",
                              query=dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True)),
                              headers=headers, body=body.head, client=base.get("client"), original=original)
    try:
        status, extra, content = answer(http, _hostname(host), target, method, port, request)
    except Exception as exc:  # the rule's script: this request goes unanswered, the run goes on
        from nftdivert.services import custom

        return 0, [], b"", {"error": custom.last_line(exc)}
    rule = match_rule(http.rules, _hostname(host), request.path, method, port, url.query)
    info = {"delay": rule.delay} if rule is not None and rule.delay else {}
    return status, extra, content, dict(info, closed=True) if status == 0 else info


def record(base: dict, version: str, method: str, url: str, status: int, headers: list, body: "Body",
           extra: dict) -> dict:
    return dict(base, event="http", http_version=version, method=method, url=url, status=status,
                headers=headers, **extra, **body.finish())


async def serve(stream, http: HttpConfig, emit: Callable[[dict], None], base: dict, scheme: str,
                transports: Transports = Transports()) -> None:
    """Answer one request on `stream` (then close, as the answer says); log it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)

    async def next_event():
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await asyncio.wait_for(stream.read(65536), READ_TIMEOUT))

    async def send(*events) -> None:
        for event in events:
            stream.write(conn.send(event) or b"")
        await stream.drain()

    body = None
    try:
        request = await next_event()
        if not isinstance(request, h11.Request):
            return  # closed before a whole request head
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw_items()]
        host = next((v for k, v in headers if k.lower() == "host"), "")
        target = request.target.decode("latin-1")
        method = request.method.decode("latin-1")
        version = request.http_version.decode("latin-1")
        if method == "CONNECT" or _websocket(headers):  # another protocol follows the request's end
            while not isinstance(event := await next_event(), h11.EndOfMessage):
                if isinstance(event, h11.ConnectionClosed):
                    return
            if method == "CONNECT":
                await _connect(conn, send, stream, emit, base, target, headers, version, transports)
                return
            from nftdivert.services import websocket  # wsproto: only once a WebSocket is asked for

            emit(record(base, version, method, _url("ws" if scheme == "http" else "wss", host, target), 101,
                        headers, Body("", 0), {}))
            await websocket.serve(conn, send, stream, http, emit, base, _hostname(host), target, headers)
            return
        body = Body(http.bodies_dir, http.max_body)
        if conn.they_are_waiting_for_100_continue:
            await send(h11.InformationalResponse(status_code=100, reason=b"Continue", headers=[]))
        while not isinstance(event := await next_event(), h11.EndOfMessage):
            if isinstance(event, h11.Data):
                body.add(bytes(event.data))
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the client closed the connection mid-body")
        status, extra, content, info = respond(http, transports, base, method, host, target, headers, body)
        if status == 0:  # a rule's `close`, or its script failed: no answer at all
            emit(record(base, version, method, _url(scheme, host, target), status, headers, body, info))
            body = None
            return
        if info.get("delay"):
            await asyncio.sleep(info["delay"])  # a slow server, as the rule says
        settings = _h2c_settings(headers) if scheme == "http" and version == "1.1" else None
        emit(record(base, version, method, _url(scheme, host, target), status, headers, body,
                    dict(info, upgrade="h2c") if settings is not None else info))
        body = None
        if settings is not None:  # Upgrade: h2c: the answer comes on HTTP/2's stream 1
            from nftdivert.services import http2, proxy  # h2: only once HTTP/2 is spoken

            await send(h11.InformationalResponse(status_code=101, reason=b"Switching Protocols",
                                                 headers=[("Connection", "Upgrade"), ("Upgrade", "h2c")]))
            await http2.serve(proxy.Prefixed(stream, conn.trailing_data[0]), http, emit, base, scheme, transports,
                              upgraded=(settings, method, status, extra, content))
            return
        server = [("Server", http.server)] if http.server else []
        # One request per connection: every client copes with a close, and none waits on a keep-alive.
        events = [h11.Response(status_code=status, reason=_reason(status), headers=server + [
            ("Date", email.utils.formatdate(usegmt=True)), *extra, ("Content-Length", str(len(content))),
            ("Connection", "close")])]
        if request.method != b"HEAD" and content:
            events.append(h11.Data(data=content))
        await send(*events, h11.EndOfMessage())
    except h11.RemoteProtocolError as exc:
        if body is not None:
            body.abandon()  # before the answer: nothing half-written outlives the request
        emit(dict(base, event="http", error=str(exc)[:200]))
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                await send(h11.Response(status_code=400, reason=b"Bad Request", headers=[("Content-Length", "0"), ("Connection", "close")]),
                           h11.EndOfMessage())
            except (h11.LocalProtocolError, ConnectionError, OSError):
                pass
    except asyncio.TimeoutError:
        if body is not None:
            body.abandon()
        emit(dict(base, event="http", error=f"no whole request within {READ_TIMEOUT:g} s"))
    finally:
        if body is not None:
            body.abandon()
    stream.write_eof()


def _websocket(headers: list[tuple[str, str]]) -> bool:
    return any(k.lower() == "upgrade" and "websocket" in v.lower() for k, v in headers)


def _h2c_settings(headers: list[tuple[str, str]]) -> str | None:
    """HTTP2-Settings of a request that asks to upgrade to h2c (RFC 7540 3.2); None: it does not."""
    upgrade = any(k.lower() == "upgrade" and "h2c" in [t.strip().lower() for t in v.split(",")] for k, v in headers)
    return next((v for k, v in headers if k.lower() == "http2-settings"), None) if upgrade else None


def connect(base: dict, version: str, target: str, headers: list, transports: Transports) -> tuple[dict, int]:
    """CONNECT's record (HTTP/1.1 or HTTP/2) and its status: 200, or why no tunnel (400, 405)."""
    from nftdivert.services import proxy

    host, port = split_authority(target)
    status = 400 if not port else 405 if transports.tunnel is None else 200  # 405: no listener to tunnel into
    rec = dict(base, event="http", http_version=version, method="CONNECT", url=target, status=status,
               headers=headers)
    if status == 200:
        return dict(rec, tunnel=proxy.authority(host, port), **proxy.named(host, transports.resolver)), 200
    return dict(rec, error=f"not host:port: {target[:100]!r}" if not port else "no tunnel here"), status


async def _connect(conn: h11.Connection, send, stream, emit, base: dict, target: str, headers: list,
                   version: str, transports: Transports) -> None:
    """CONNECT host:port: logged, answered 200, and the tunnel served as if the client had connected there."""
    from nftdivert.services import proxy

    rec, status = connect(base, version, target, headers, transports)
    emit(rec)
    if status != 200:
        await send(h11.Response(status_code=status, reason=_reason(status),
                                headers=[("Content-Length", "0"), ("Connection", "close")]), h11.EndOfMessage())
        return
    await send(h11.Response(status_code=200, reason=b"Connection established", headers=[]))
    await transports.tunnel(proxy.Prefixed(stream, conn.trailing_data[0]), base, *split_authority(target))


def split_authority(target: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6]:port"; port 0 when there is none."""
    try:
        parts = urllib.parse.urlsplit("//" + target)
        return parts.hostname or "", parts.port or 0
    except ValueError:
        return "", 0


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _hostname(host: str) -> str:
    """The Host header without its port; a malformed one as it came."""
    try:
        return urllib.parse.urlsplit("//" + host).hostname or ""
    except ValueError:
        return host


def _url(scheme: str, host: str, target: str) -> str:
    if target.startswith(("http://", "https://", "ws://", "wss://")):
        return target  # a proxy-style absolute URL
    return f"{scheme}://{host}{target}" if host else target
