"""HTTP/2 (over TLS after ALPN h2, h2c with prior knowledge, or an HTTP/1.1 upgrade), parsed by h2.

Each stream is one request, read whole, answered and logged like an
HTTP/1.1 one (http.respond: the same rules, payloads and DoH) with
`http_version` "2"; the headers are logged as they came, pseudo-headers
(:method, :authority, :path) included. A CONNECT stream is a proxy's
tunnel, as HTTP/1.1's CONNECT is: its DATA frames are the tunnel's bytes.
Everything sent waits on the client's flow control window, so a large
file is sent as the client takes it.
"""

from __future__ import annotations

import asyncio
import email.utils

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.exceptions

from nftdivert.config import HttpConfig
from nftdivert.services import http

TUNNEL_IDLE = 300.0  # with a tunnel open, a quiet connection is a C2 channel waiting, not a dead one
_CONNECTION_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}


async def serve(stream, cfg: HttpConfig, emit, base: dict, scheme: str,
                transports: http.Transports = http.Transports(), upgraded: tuple | None = None) -> None:
    """`upgraded`: (HTTP2-Settings, method, status, headers, body) of an HTTP/1.1 request answered on stream 1."""
    await _Session(stream, cfg, emit, base, scheme, transports).serve(upgraded)


class _Session:
    def __init__(self, stream, cfg: HttpConfig, emit, base: dict, scheme: str, transports: http.Transports) -> None:
        self.stream, self.cfg, self.emit, self.base, self.scheme = stream, cfg, emit, base, scheme
        self.transports = transports
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, tuple[list[tuple[str, str]], http.Body]] = {}
        self.pending: dict[int, tuple[bytes, bool]] = {}  # what waits for the window, and whether it ends the stream
        self.tunnels: dict[int, _Tunnel] = {}
        self.tasks: set[asyncio.Task] = set()

    async def serve(self, upgraded: tuple | None) -> None:
        conn, stream = self.conn, self.stream
        if upgraded is None:
            conn.initiate_connection()
        else:
            try:
                conn.initiate_upgrade_connection(upgraded[0].encode("latin-1"))
            except (h2.exceptions.ProtocolError, hyperframe.exceptions.InvalidFrameError, ValueError) as exc:
                # HTTP2-Settings that do not decode (hyperframe's error escapes h2 here alone)
                self.emit(dict(self.base, event="http", http_version="2", error=str(exc)[:200] or type(exc).__name__))
                stream.write_eof()
                return
            self.pending[1] = (self._send_answer(1, *upgraded[1:]), True)
        try:
            while True:
                await self.flush()
                idle = TUNNEL_IDLE if self.tunnels else http.READ_TIMEOUT
                data = await asyncio.wait_for(stream.read(65536), idle)
                if not data:
                    # The client ended the connection (HTTP/2 clients do, not the server): nothing more is
                    # sent, not even TLS's close_notify, which would meet a closed socket and make it reset.
                    return
                try:
                    for event in conn.receive_data(data):
                        self._event(event)
                    self._send_pending()
                except h2.exceptions.ProtocolError as exc:
                    self.emit(dict(self.base, event="http", http_version="2", error=str(exc)[:200] or type(exc).__name__))
                    stream.write(conn.data_to_send())  # the GOAWAY
                    break
        except asyncio.TimeoutError:
            pass
        finally:
            for _headers, body in self.requests.values():
                body.abandon()
            for tunnel in list(self.tunnels.values()):
                tunnel.feed(b"")  # the end, even for a tunnel that does not heed its cancellation
            for task in self.tasks:
                task.cancel()
        stream.write(conn.data_to_send())  # we end it: a timeout or the client's protocol error
        stream.write_eof()

    async def flush(self) -> None:
        self.stream.write(self.conn.data_to_send())
        await self.stream.drain()

    def _event(self, event) -> None:
        """Requests gathered per stream; each answered once whole, its body queued for the window."""
        sid = getattr(event, "stream_id", 0)
        if isinstance(event, h2.events.RequestReceived):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            if dict(headers).get(":method") == "CONNECT":
                self._connect(sid, headers)
            else:
                self.requests[sid] = (headers, http.Body(self.cfg.bodies_dir, self.cfg.max_body))
        elif isinstance(event, h2.events.DataReceived):
            if sid in self.requests:
                self.requests[sid][1].add(event.data)
            elif sid in self.tunnels:
                self.tunnels[sid].feed(event.data)
            self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.StreamEnded):
            if sid in self.requests:
                headers, body = self.requests.pop(sid)
                content = self._answer(sid, headers, body)
                if content:
                    self.pending[sid] = (content, True)
            elif sid in self.tunnels:
                self.tunnels[sid].feed(b"")  # the client's half-close
        elif isinstance(event, h2.events.StreamReset):
            self.pending.pop(sid, None)
            gone = self.requests.pop(sid, None)
            if gone is not None:
                gone[1].abandon()
            if sid in self.tunnels:
                self.tunnels.pop(sid).feed(b"")

    def _connect(self, sid: int, headers: list[tuple[str, str]]) -> None:
        """A CONNECT stream (RFC 9113 8.5): logged, answered 200, its DATA the tunnel's bytes."""
        target = dict(headers).get(":authority", "")
        rec, status = http.connect(self.base, "2", target, headers, self.transports)
        self.emit(rec)
        if status != 200:
            self.conn.send_headers(sid, [(":status", str(status)), ("content-length", "0")], end_stream=True)
            return
        self.conn.send_headers(sid, [(":status", "200")])
        tunnel = self.tunnels[sid] = _Tunnel(self, sid)
        task = asyncio.ensure_future(self._run_tunnel(tunnel, *http.split_authority(target)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_tunnel(self, tunnel: "_Tunnel", host: str, port: int) -> None:
        try:
            await self.transports.tunnel(tunnel, self.base, host, port)
        except (ConnectionError, OSError, h2.exceptions.ProtocolError):
            pass  # the connection went, or the stream: nothing left to answer on
        finally:
            tunnel.write_eof()
            try:
                await self.flush()
            except (ConnectionError, OSError):
                pass

    def _answer(self, sid: int, headers: list[tuple[str, str]], body) -> bytes:
        """Log and answer one whole request; the body to send (flow control permitting)."""
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        method, path = pseudo.get(":method", ""), pseudo.get(":path", "")
        host = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
        status, extra, content, info = http.respond(self.cfg, self.transports, self.base, method, host, path,
                                                    headers, body)
        self.emit(http.record(self.base, "2", method, f"{pseudo.get(':scheme', self.scheme)}://{host}{path}", status,
                              headers, body, info))
        if status == 0:  # a rule's close or a failed script: a stream is answered, so with nothing useful
            status, extra, content = 502, [], b""
        return self._send_answer(sid, method, status, extra, content)

    def _send_answer(self, sid: int, method: str, status: int, extra: list, content: bytes) -> bytes:
        """The answer's headers, now; its body is returned, to be sent as the window allows."""
        content_length = len(content)
        if method == "HEAD":
            content = b""
        server = [("server", self.cfg.server)] if self.cfg.server else []
        # A rule's HTTP/1.1-only headers are not HTTP/2's: h2 drops most, and refuses the answer for TE.
        kept = [(k.lower(), v) for k, v in extra if k.lower() not in _CONNECTION_HEADERS]
        self.conn.send_headers(sid, [(":status", str(status)), *server, ("date", email.utils.formatdate(usegmt=True)),
                                     *kept, ("content-length", str(content_length))], end_stream=not content)
        return content

    def _send_pending(self) -> None:
        """As much of each stream's data as the windows allow; the rest after the client's WINDOW_UPDATE."""
        conn = self.conn
        for sid in list(self.pending):
            data, end = self.pending[sid]
            try:
                while data:
                    size = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(data))
                    if size <= 0:
                        break
                    conn.send_data(sid, data[:size], end_stream=end and size == len(data))
                    data = data[size:]
                else:
                    if end and conn.streams.get(sid) is not None and not conn.streams[sid].closed:
                        conn.end_stream(sid)  # a tunnel's end with nothing left to send
            except h2.exceptions.StreamClosedError:  # the client reset it meanwhile: nobody waits for the rest
                data = b""
            if data:
                self.pending[sid] = (data, end)
            else:
                del self.pending[sid]


class _Tunnel:
    """A CONNECT stream as the stream a proxy's tunnel reads and writes."""

    def __init__(self, session: _Session, sid: int) -> None:
        self._session, self._sid = session, sid
        self._incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self._left = b""
        self._ended = False

    def feed(self, data: bytes) -> None:
        self._incoming.put_nowait(data)

    async def read(self, n: int = 65536) -> bytes:
        if not self._left:
            if self._ended:
                return b""
            self._left = await self._incoming.get()
            if not self._left:
                self._ended = True
                return b""
        data, self._left = self._left[:n], self._left[n:]
        return data

    def write(self, data: bytes) -> None:
        if data:
            queued, end = self._session.pending.get(self._sid, (b"", False))
            self._session.pending[self._sid] = (queued + data, end)
            self._session._send_pending()

    async def drain(self) -> None:
        await self._session.flush()

    def write_eof(self) -> None:
        session = self._session
        if session.tunnels.pop(self._sid, None) is None:
            return  # ended already (reset)
        queued, _end = session.pending.get(self._sid, (b"", False))
        session.pending[self._sid] = (queued, True)
        session._send_pending()
