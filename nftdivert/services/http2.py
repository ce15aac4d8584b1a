"""HTTP/2 (over TLS after ALPN h2, or h2c with prior knowledge), parsed by h2.

Each stream is one request, read whole, answered and logged like an
HTTP/1.1 one (http.respond: the same rules, payloads and DoH) with
`http_version` "2"; the headers are logged as they came, pseudo-headers
(:method, :authority, :path) included. Answers wait on the client's flow
control window, so a large file is sent as the client takes it.
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


_CONNECTION_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}


async def serve(stream, cfg: HttpConfig, emit, base: dict, scheme: str,
                transports: http.Transports = http.Transports(), upgraded: tuple | None = None) -> None:
    """`upgraded`: (HTTP2-Settings, method, status, headers, body) of an HTTP/1.1 request answered on stream 1."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    requests: dict[int, tuple[list[tuple[str, str]], http.Body]] = {}
    pending: dict[int, bytes] = {}  # answers' bodies still waiting for the window
    if upgraded is None:
        conn.initiate_connection()
    else:
        try:
            conn.initiate_upgrade_connection(upgraded[0].encode("latin-1"))
        except (h2.exceptions.ProtocolError, hyperframe.exceptions.InvalidFrameError, ValueError) as exc:
            # HTTP2-Settings that do not decode (hyperframe's error escapes h2 here alone)
            emit(dict(base, event="http", http_version="2", error=str(exc)[:200] or type(exc).__name__))
            stream.write_eof()
            return
        pending[1] = _send_answer(conn, cfg, 1, *upgraded[1:])
    try:
        while True:
            stream.write(conn.data_to_send())
            await stream.drain()
            data = await asyncio.wait_for(stream.read(65536), http.READ_TIMEOUT)
            if not data:
                # The client ended the connection (HTTP/2 clients do, not the server): nothing more is
                # sent, not even TLS's close_notify, which would meet a closed socket and make it reset.
                return
            try:
                _handle(conn, conn.receive_data(data), requests, pending, cfg, transports, emit, base, scheme)
            except h2.exceptions.ProtocolError as exc:
                emit(dict(base, event="http", http_version="2", error=str(exc)[:200] or type(exc).__name__))
                stream.write(conn.data_to_send())  # the GOAWAY
                break
    except asyncio.TimeoutError:
        pass
    finally:
        for _headers, body in requests.values():
            body.abandon()
    stream.write(conn.data_to_send())  # we end it: a timeout or the client's protocol error
    stream.write_eof()


def _handle(conn, events, requests: dict, pending: dict, cfg: HttpConfig, transports, emit, base: dict,
            scheme: str) -> None:
    """Requests gathered per stream; each answered once whole, its body queued for the window."""
    for event in events:
        if isinstance(event, h2.events.RequestReceived):
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            requests[event.stream_id] = (headers, http.Body(cfg.bodies_dir, cfg.max_body))
        elif isinstance(event, h2.events.DataReceived):
            if event.stream_id in requests:
                requests[event.stream_id][1].add(event.data)
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id in requests:
            headers, body = requests.pop(event.stream_id)
            content = _answer(conn, cfg, transports, emit, base, scheme, event.stream_id, headers, body)
            if content:
                pending[event.stream_id] = content
        elif isinstance(event, h2.events.StreamReset):
            pending.pop(event.stream_id, None)
            gone = requests.pop(event.stream_id, None)
            if gone is not None:
                gone[1].abandon()
    _send_pending(conn, pending)


def _answer(conn, cfg: HttpConfig, transports, emit, base: dict, scheme: str, stream_id: int,
            headers: list[tuple[str, str]], body) -> bytes:
    """Log and answer one whole request; the body to send (flow control permitting)."""
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    method, path = pseudo.get(":method", ""), pseudo.get(":path", "")
    host = pseudo.get(":authority") or next((v for k, v in headers if k == "host"), "")
    status, extra, content, info = http.respond(cfg, transports, base, method, host, path, headers, body)
    emit(http.record(base, "2", method, f"{pseudo.get(':scheme', scheme)}://{host}{path}", status, headers,
                     body, info))
    return _send_answer(conn, cfg, stream_id, method, status, extra, content)


def _send_answer(conn, cfg: HttpConfig, stream_id: int, method: str, status: int, extra: list, content: bytes) -> bytes:
    """The answer's headers, now; its body is returned, to be sent as the window allows."""
    content_length = len(content)
    if method == "HEAD":
        content = b""
    server = [("server", cfg.server)] if cfg.server else []
    # A rule's HTTP/1.1-only headers are not HTTP/2's: h2 drops most, and refuses the answer for TE.
    kept = [(k.lower(), v) for k, v in extra if k.lower() not in _CONNECTION_HEADERS]
    conn.send_headers(stream_id, [(":status", str(status)), *server, ("date", email.utils.formatdate(usegmt=True)),
                                  *kept, ("content-length", str(content_length))], end_stream=not content)
    return content


def _send_pending(conn, pending: dict[int, bytes]) -> None:
    """As much of each answer as the windows allow; the rest after the client's WINDOW_UPDATE."""
    for stream_id in list(pending):
        data = pending[stream_id]
        try:
            while data:
                size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(data))
                if size <= 0:
                    break
                conn.send_data(stream_id, data[:size], end_stream=size == len(data))
                data = data[size:]
        except h2.exceptions.StreamClosedError:  # the client reset it meanwhile: nobody waits for the rest
            data = b""
        if data:
            pending[stream_id] = data
        else:
            del pending[stream_id]
