"""FTP: any login succeeds and is logged; uploads are kept; any file asked for is served.

By hand, on the listener's asyncio loop, because of the data connection.
Passive: it goes to the address the client asked for, on the port PASV
names, and nftdivert diverts it to this same default listener like any
other conversation. The listener asks for its original destination and
hands it to the session waiting on that port (`claim`); with several
listener processes, another process's session gets it via handoff.py. pyftpdlib would
bind that port itself, and a port bound moments before is not yet known as
bound, so the connection would be diverted away from it. Active (PORT,
EPRT): the session connects to the client from the address it asked for
(`active`). RETR serves a small valid file by the name's extension, like
the HTTP answer; LIST shows a plausible tree. AUTH TLS upgrades the
control connection, PROT P the data connections.
"""

from __future__ import annotations

import asyncio
import random

from nftdivert.config import ServerFirstConfig
from nftdivert.services import active, handoff, payloads
from nftdivert.services.mailbox import Lines, say
from nftdivert.services.mailstore import keep
from nftdivert.services.origin import client_fields

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
    if waiting is not None and handoff.current is not None:
        handoff.current.withdraw(client_host, port)
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
            if handoff.current is not None:  # before the reply naming the port: a sibling may accept it
                handoff.current.announce(client_host, port)
            return port, future


def pasv_reply(address: str, port: int) -> str:
    """227 with the address the client asked for (IPv4) and the port."""
    return f"227 Entering Passive Mode ({address.replace('.', ',')},{port >> 8},{port & 255})."


def port_argument(verb: str, arg: str) -> tuple[str, int] | None:
    """The client's data address from PORT (h1,h2,h3,h4,p1,p2) or EPRT (|1|addr|port|); None if malformed."""
    try:
        if verb == "PORT":
            parts = [int(x) for x in arg.split(",")]
            if len(parts) != 6 or not all(0 <= x <= 255 for x in parts):
                return None
            return ".".join(map(str, parts[:4])), parts[4] << 8 | parts[5]
        _, family, host, port, _ = arg.split(arg[0])
        if family not in ("1", "2") or not 0 < int(port) < 65536:
            return None
        return host, int(port)
    except (ValueError, IndexError):
        return None


TREE = (("drwxr-xr-x", "pub", 4096), ("drwxr-xr-x", "upload", 4096), ("-rw-r--r--", "readme.txt", 3),
        ("-rw-r--r--", "update.exe", 1024), ("-rw-r--r--", "data.zip", 154))


def listing(verb: str) -> bytes:
    """A plausible directory, the same for every path: LIST as ls -l, NLST names, MLSD facts."""
    lines = []
    for mode, name, size in TREE:
        if verb == "NLST":
            lines.append(name)
        elif verb == "MLSD":
            kind = "dir" if mode[0] == "d" else "file"
            lines.append(f"type={kind};size={size};modify=20240101000000; {name}")
        else:
            lines.append(f"{mode} 1 ftp ftp {size:>8} Jan 01  2024 {name}")
    return "".join(line + "\r\n" for line in lines).encode()


def file_for(name: str) -> bytes:
    """What RETR serves: a small valid file of the name's type (payloads), else a line of text."""
    ext = name.rsplit(".", 1)[1] if "." in name.rsplit("/", 1)[-1] else ""
    typed = payloads.by_extension(ext) if ext else None
    return typed[1] if typed is not None else b"ok\n"


def _offers(upgrade) -> bool:
    """STARTTLS and its kind are offered where TLS is possible and not yet spoken."""
    return upgrade is not None and not upgrade.secure


class Session:
    def __init__(self, stream, config: ServerFirstConfig, emit, base: dict, client_host: str, asked: str,
                 upgrade) -> None:
        self.stream, self.config, self.emit, self.base = stream, config, emit, base
        self.client_host, self.asked, self.upgrade = client_host, asked, upgrade
        self.user = ""
        self.data: tuple[tuple[str, int], asyncio.Future] | None = None  # the passive port expected
        self.target: tuple[str, int] | None = None  # active: where the client listens
        self.protect = False  # PROT P: data connections in TLS
        self.lines = Lines(stream)

    async def run(self) -> None:
        await say(self.stream, "220 (vsFTPd 3.0.3)")  # as scanners know it
        try:
            for _ in range(MAX_COMMANDS):
                line = await self.lines.next()
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
                  "MDTM": "213 20240101000000", "PBSZ": "200 PBSZ=0",
                  "REST": "350 Restart position accepted.", "ALLO": "202 No storage allocation necessary."}
        if verb == "USER":
            self.user = arg
            await say(self.stream, "331 Please specify the password.")
        elif verb == "PASS":
            self.emit(dict(self.base, event="ftp", user=self.user, password=arg))
            await say(self.stream, "230 Login successful.")
        elif verb == "FEAT":
            tls = [" AUTH TLS", " PBSZ", " PROT"] if _offers(self.upgrade) else []
            await say(self.stream, "211-Features:", *tls, " EPRT", " EPSV", " MDTM", " MLSD", " PASV", " REST STREAM",
                      " SIZE", " UTF8", "211 End")
        elif verb == "AUTH" and arg.upper() in ("TLS", "SSL", "TLS-C") and _offers(self.upgrade):
            await say(self.stream, "234 Proceed with negotiation.")
            self.stream = await self.upgrade(self.stream, starttls=True)
            if self.stream is None:
                return False
            self.lines = Lines(self.stream)  # what was sent in the clear is forgotten
        elif verb == "PROT":
            self.protect = arg.upper() == "P"
            await say(self.stream, f"200 Protection level set to {'P' if self.protect else 'C'}.")
        elif verb in ("PASV", "EPSV"):
            self._forget()
            port, future = _expect(self.client_host)
            self.data = ((self.client_host, port), future)
            if verb == "EPSV" or ":" in self.asked:
                await say(self.stream, f"229 Entering Extended Passive Mode (|||{port}|)")
            else:
                await say(self.stream, pasv_reply(self.asked, port))
        elif verb in ("PORT", "EPRT"):
            self._forget()
            self.target = port_argument(verb, arg)
            await say(self.stream, f"200 {verb} command successful." if self.target else f"501 Bad {verb} argument.")
        elif verb in ("STOR", "APPE", "STOU", "LIST", "NLST", "MLSD", "RETR"):
            await self.transfer(verb, arg)
        elif verb == "SIZE":
            await say(self.stream, f"213 {len(file_for(arg))}")
        elif verb == "QUIT":
            await say(self.stream, "221 Goodbye.")
            return False
        elif verb in simple:
            await say(self.stream, simple[verb])
        else:
            await say(self.stream, "502 Command not implemented.")
        return True

    async def _connect(self):
        """(data stream, its end) for the next transfer, passive or active; None: none came (425 said)."""
        if self.target is not None:
            target, self.target = self.target, None
            got = await active.connect(self.asked, target)
            if got is None:
                await say(self.stream, "425 Failed to establish connection.")
            return got
        if self.data is None:
            await say(self.stream, "425 Use PORT or PASV first.")
            return None
        _key, future = self.data
        try:
            data_stream, done = await asyncio.wait_for(future, DATA_TIMEOUT)
        except asyncio.TimeoutError:
            self._forget()
            await say(self.stream, "425 Failed to establish connection.")
            return None
        self.data = None

        async def end() -> None:
            done.set_result(None)
        return data_stream, end

    async def transfer(self, verb: str, name: str) -> None:
        got = await self._connect()
        if got is None:
            return
        data_stream, end = got
        upload = verb in ("STOR", "APPE", "STOU")
        try:
            await say(self.stream, "150 Ok to send data." if upload else "150 Opening BINARY mode data connection.")
            if self.protect and self.upgrade is not None:  # PROT P: the client's ClientHello comes after the 150
                # The data connection's client, as the listener saw it (the session's client port is not its).
                peer = data_stream.writer.get_extra_info("peername")
                base = {key: value for key, value in self.base.items() if key != "listener_client_port"}
                data_stream = await self.upgrade(data_stream, base={**base, "ftp_data": True, **client_fields(peer, None)})
                if data_stream is None:
                    await say(self.stream, "522 TLS negotiation failed on the data connection.")
                    return
            if upload:
                await self._receive(data_stream, name)
            else:
                body = file_for(name) if verb == "RETR" else listing(verb)
                data_stream.write(body)
                await data_stream.drain()
                if verb == "RETR":
                    self.emit(dict(self.base, event="ftp_download", user=self.user, name=name[:1024],
                                   size=len(body)))
            close = getattr(data_stream, "close", None)
            if close is not None:  # TLS: close_notify, FIN, the client's close_notify read
                await close()
            else:
                data_stream.write_eof()
        finally:
            await end()
        await say(self.stream, "226 Transfer complete.")

    async def _receive(self, data_stream, name: str) -> None:
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

    def _forget(self) -> None:
        if self.data is not None:
            key, future = self.data
            if _expected.get(key) is future:
                del _expected[key]
                if handoff.current is not None:
                    handoff.current.withdraw(*key)
            future.cancel()
            self.data = None


async def serve(stream, config: ServerFirstConfig, emit, base: dict, peer, asked: str, upgrade=None) -> None:
    """`asked`: the address the client asked for, which PASV names and active data connections come from."""
    await Session(stream, config, emit, base, peer[0].removeprefix("::ffff:"), asked, upgrade).run()
