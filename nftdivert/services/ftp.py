"""FTP: any login succeeds and is logged; uploads are kept; the directory is empty.

By hand, on the listener's asyncio loop, because of the data connection:
it goes to the address the client asked for, on the port PASV names, and
nftdivert diverts it to this same default listener like any other
conversation. The listener asks for its original destination and hands it
to the session waiting on that port (`claim`). pyftpdlib would bind that
port itself, and a port bound moments before is not yet known as bound, so
the connection would be diverted away from it.
"""

from __future__ import annotations

import asyncio
import random

from nftdivert.config import ServerFirstConfig
from nftdivert.services.mailbox import Lines, say
from nftdivert.services.mailstore import keep

DATA_TIMEOUT = 10.0  # seconds a session waits for the client's data connection
MAX_COMMANDS = 1000
MAX_UPLOAD = 64 * 1024 * 1024  # bytes kept of one upload; the rest is read and dropped
PASSIVE_PORTS = (49152, 65535)

# (client address, port) -> the future the session waits on for the data stream.
_expected: dict[tuple[str, int], asyncio.Future] = {}


def expecting() -> bool:
    return bool(_expected)


def claim(client_host: str, port: int, stream) -> asyncio.Future | None:
    """Hand a data connection to the session waiting for it; the future ends when the session is done with it."""
    waiting = _expected.pop((client_host, port), None)
    if waiting is None or waiting.done():
        return None
    done = asyncio.get_running_loop().create_future()
    waiting.set_result((stream, done))
    return done


def _expect(client_host: str) -> tuple[int, asyncio.Future]:
    while True:
        port = random.randint(*PASSIVE_PORTS)
        if (client_host, port) not in _expected:
            future = asyncio.get_running_loop().create_future()
            _expected[client_host, port] = future
            return port, future


def pasv_reply(address: str, port: int) -> str:
    """227 with the address the client asked for (IPv4) and the port."""
    return f"227 Entering Passive Mode ({address.replace('.', ',')},{port >> 8},{port & 255})."


class Session:
    def __init__(self, stream, config: ServerFirstConfig, emit, base: dict, client_host: str, asked: str) -> None:
        self.stream, self.config, self.emit, self.base = stream, config, emit, base
        self.client_host, self.asked = client_host, asked
        self.user = ""
        self.data: tuple[tuple[str, int], asyncio.Future] | None = None  # the passive port expected

    async def run(self) -> None:
        lines = Lines(self.stream)
        await say(self.stream, f"220 {self.config.hostname} FTP server ready.")
        try:
            for _ in range(MAX_COMMANDS):
                line = await lines.next()
                if line is None:
                    return
                verb, _, arg = line.partition(" ")
                if not await self.command(verb.upper(), arg):
                    return
        finally:
            self._forget()

    async def command(self, verb: str, arg: str) -> bool:
        simple = {"SYST": "215 UNIX Type: L8", "PWD": '257 "/" is the current directory', "NOOP": "200 NOOP ok.",
                  "TYPE": "200 Switching mode.", "MODE": "200 Mode set.", "STRU": "200 Structure set.",
                  "OPTS": "200 Always in UTF8 mode.", "CWD": "250 Directory successfully changed.",
                  "CDUP": "250 Directory successfully changed.", "MKD": f'257 "{arg}" created',
                  "DELE": "250 Delete operation successful.", "RMD": "250 Remove directory operation successful.",
                  "SIZE": "550 Could not get file size.", "MDTM": "550 Could not get file modification time.",
                  "PORT": "502 Active mode is not offered; use PASV.",
                  "EPRT": "502 Active mode is not offered; use EPSV."}
        if verb == "USER":
            self.user = arg
            await say(self.stream, "331 Please specify the password.")
        elif verb == "PASS":
            self.emit(dict(self.base, event="ftp", user=self.user, password=arg))
            await say(self.stream, "230 Login successful.")
        elif verb == "FEAT":
            await say(self.stream, "211-Features:", " EPSV", " PASV", " SIZE", " UTF8", "211 End")
        elif verb in ("PASV", "EPSV"):
            self._forget()
            port, future = _expect(self.client_host)
            self.data = ((self.client_host, port), future)
            if verb == "EPSV" or ":" in self.asked:
                await say(self.stream, f"229 Entering Extended Passive Mode (|||{port}|)")
            else:
                await say(self.stream, pasv_reply(self.asked, port))
        elif verb in ("STOR", "APPE", "STOU"):
            await self.transfer(arg, upload=True)
        elif verb in ("LIST", "NLST", "MLSD"):
            await self.transfer(arg, upload=False)
        elif verb == "RETR":
            self._forget()
            await say(self.stream, "550 Failed to open file.")
        elif verb == "QUIT":
            await say(self.stream, "221 Goodbye.")
            return False
        elif verb in simple:
            await say(self.stream, simple[verb])
        else:
            await say(self.stream, "502 Command not implemented.")
        return True

    async def transfer(self, name: str, upload: bool) -> None:
        if self.data is None:
            await say(self.stream, "425 Use PASV or EPSV first.")
            return
        _key, future = self.data
        try:
            data_stream, done = await asyncio.wait_for(future, DATA_TIMEOUT)
        except asyncio.TimeoutError:
            self._forget()
            await say(self.stream, "425 Failed to establish connection.")
            return
        self.data = None
        try:
            if upload:
                await say(self.stream, "150 Ok to send data.")
                got, size = [], 0
                while chunk := await data_stream.read(65536):
                    size += len(chunk)
                    if size <= MAX_UPLOAD:
                        got.append(chunk)
                body = b"".join(got)
                info = keep(self.config.uploads_dir, body)
                if size > len(body):
                    info["size"] = size  # hashed and kept: the first MAX_UPLOAD bytes
                self.emit(dict(self.base, event="ftp_upload", user=self.user, name=name[:1024], **info))
            else:
                await say(self.stream, "150 Here comes the directory listing.")
                data_stream.write_eof()
        finally:
            done.set_result(None)
        await say(self.stream, "226 Transfer complete." if upload else "226 Directory send OK.")

    def _forget(self) -> None:
        if self.data is not None:
            key, future = self.data
            if _expected.get(key) is future:
                del _expected[key]
            future.cancel()
            self.data = None


async def serve(stream, config: ServerFirstConfig, emit, base: dict, peer, asked: str) -> None:
    """`asked`: the address the client asked for, which PASV names."""
    await Session(stream, config, emit, base, peer[0].removeprefix("::ffff:"), asked).run()
