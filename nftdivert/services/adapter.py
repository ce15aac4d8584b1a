"""An asyncio Protocol served over one of the listener's streams (tls.Plain or tls.Tls).

aiosmtpd and asyncssh are Protocols that expect a transport of their own.
The default listener has already read (and maybe decrypted) the
conversation, so this transport writes into that stream and the bytes the
stream reads are fed to the protocol, until either side closes.
"""

from __future__ import annotations

import asyncio


class StreamTransport(asyncio.Transport):
    def __init__(self, stream, extra: dict) -> None:
        super().__init__(extra)
        self._stream = stream
        self.closed = asyncio.get_running_loop().create_future()
        # Set by the protocol before it answers STARTTLS: the client's next bytes start a handshake.
        self.tls_wanted: asyncio.Future | None = None

    def write(self, data) -> None:
        if not self.closed.done():
            self._stream.write(bytes(data))

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed.done()

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    abort = close

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:  # the pump reads one chunk at a time anyway
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed.done()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass


async def serve(protocol: asyncio.Protocol, stream, extra: dict, upgrade=None) -> None:
    """Run `protocol` over `stream` until it closes the transport or the client goes.

    `upgrade(stream, first)`: the TLS stream over `stream` (None if the
    handshake failed), for a protocol that sets `transport.tls_wanted`.
    """
    transport = StreamTransport(stream, extra)
    protocol.connection_made(transport)
    error, read = None, None
    try:
        while not transport.is_closing():
            read = asyncio.ensure_future(stream.read(65536))
            await asyncio.wait((read, transport.closed), return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                read.cancel()
                break
            data = read.result()
            if not data:
                protocol.eof_received()
                break
            wanted = transport.tls_wanted
            if wanted is not None and not wanted.done() and upgrade is not None:
                transport.tls_wanted = None
                tls = await upgrade(stream, data, starttls=True)
                if tls is None:
                    wanted.set_result(False)
                    break
                stream = transport._stream = tls
                wanted.set_result(True)
                continue
            protocol.data_received(data)
            await stream.drain()
    except (ConnectionError, OSError) as exc:
        error = exc
    finally:
        if read is not None and not read.done():
            read.cancel()  # cancelled itself: no read outlives the conversation
        transport.close()
        try:
            await stream.drain()  # what the protocol said last
        except (ConnectionError, OSError):
            pass
        protocol.connection_lost(error)
