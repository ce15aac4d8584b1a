"""A scripted stream for the services' state machines: what the client sends, then EOF."""

from __future__ import annotations

import asyncio


class Stream:
    """Hands out the given chunks, one a read, then b""; keeps what is written."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks, self.written = list(chunks), b""

    async def read(self, _n: int = 65536) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        await asyncio.sleep(0)  # lets a task reading alongside (chargen's) run
