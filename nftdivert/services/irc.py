"""IRC (RFC 1459/2812): a bot registers, joins its channels and talks, as on a real network.

Registration gets the welcome burst (001-005) and a MOTD, JOIN the channel
with the bot alone in it, PING its PONG; the server PINGs a bot that stays
quiet. Nothing is ever said to the bot in its channel: it waits for a
command that never comes, and every line it sends is evidence. Logged
(`event = "irc"`): the registration (nick, user, real name, password), each
JOIN (channel, key), each PRIVMSG and NOTICE (target, text), the QUIT.
"""

from __future__ import annotations

import asyncio

IDLE_PING = 90.0  # seconds of quiet before the server PINGs
MAX_LINE = 4096  # RFC 2812 says 512; bots and their payloads send more
MAX_RECORDS = 1000  # records per connection; a flooding bot is cut off from the log, not from the server
_NETWORK = "IRCnet"


def parse(line: str) -> tuple[str, list[str]]:
    """(command, parameters) of one line; the prefix is dropped, a trailing parameter is kept whole."""
    if line.startswith(":"):
        line = line.partition(" ")[2]
    head, colon, trailing = line.partition(" :")
    words = head.split()
    if not words:
        return "", []
    params = words[1:] + ([trailing] if colon else [])
    return words[0].upper(), params


class Session:
    def __init__(self, stream, emit, base: dict, server: str, host: str) -> None:
        self.stream, self.emit, self.base, self.server, self.host = stream, emit, base, server, host
        self.nick, self.user, self.realname, self.password = "*", "", "", None
        self.registered = self.capping = False
        self.channels: set[str] = set()
        self.records = 0

    @property
    def mask(self) -> str:
        return f"{self.nick}!{self.user or self.nick}@{self.host}"

    def log(self, command: str, **fields) -> None:
        if self.records < MAX_RECORDS:
            self.records += 1
            self.emit(dict(self.base, event="irc", command=command, nick=self.nick, **fields))

    def send(self, *lines: str) -> None:
        self.stream.write("".join(line + "\r\n" for line in lines).encode("utf-8", "replace"))

    def reply(self, code: str, *text: str) -> None:
        self.send(f":{self.server} {code} {self.nick} " + " ".join(text))

    async def run(self) -> None:
        buffer, pinged = b"", False
        while True:
            while b"\n" not in buffer:
                if len(buffer) > MAX_LINE:
                    return
                try:
                    data = await asyncio.wait_for(self.stream.read(4096), IDLE_PING)
                except asyncio.TimeoutError:
                    if pinged:
                        self.send(f"ERROR :Closing Link: {self.host} (Ping timeout)")
                        await self.stream.drain()
                        return
                    pinged = True
                    self.send(f"PING :{self.server}")
                    await self.stream.drain()
                    continue
                if not data:
                    return
                buffer += data
                pinged = False
            line, buffer = buffer.split(b"\n", 1)
            command, params = parse(line.rstrip(b"\r").decode("utf-8", "replace"))
            if command and not self.command(command, params):
                await self.stream.drain()
                return
            await self.stream.drain()

    def command(self, command: str, params: list[str]) -> bool:
        """Answer one command; False when the client quits."""
        arg = params[0] if params else ""
        if command == "CAP":
            sub = arg.upper()
            if sub == "LS":
                self.capping = True
                self.send(f":{self.server} CAP * LS :")
            elif sub == "REQ":
                self.send(f":{self.server} CAP * NAK :{params[-1] if len(params) > 1 else ''}")
            elif sub == "END":
                self.capping = False
        elif command == "PASS":
            self.password = arg
        elif command == "NICK" and arg:
            if self.registered:
                self.send(f":{self.mask} NICK :{arg}")
            self.nick = arg[:30]
        elif command == "USER" and params:
            self.user, self.realname = arg[:30], params[-1] if len(params) >= 4 else ""
        elif command == "PING":
            self.send(f":{self.server} PONG {self.server} :{arg}")
        elif command == "PONG":
            pass
        elif command == "QUIT":
            self.log("QUIT", message=arg[:512])
            self.send(f"ERROR :Closing Link: {self.host} (Quit: {arg})")
            return False
        elif not self.registered:
            if command not in ("NICK", "USER"):
                self.reply("451", ":You have not registered")
        else:
            self.registered_command(command, params)
        if not self.registered and not self.capping and self.user and self.nick != "*":
            self.welcome()
        return True

    def welcome(self) -> None:
        self.registered = True
        self.log("register", user=self.user, realname=self.realname[:256],
                 **({"password": self.password[:256]} if self.password is not None else {}))
        self.reply("001", f":Welcome to the {_NETWORK} IRC Network {self.mask}")
        self.reply("002", f":Your host is {self.server}, running version ircd-2.11.2")
        self.reply("003", ":This server was created Mon Jan 6 2025 at 10:00:00 UTC")
        self.reply("004", f"{self.server} ircd-2.11.2 aoOirw abeiIklmnoOpqrRstv")
        self.reply("005", "CHANTYPES=#& PREFIX=(ov)@+ CHANMODES=beI,k,l,imnpstr NICKLEN=30 "
                          f"NETWORK={_NETWORK} CASEMAPPING=rfc1459 :are supported by this server")
        self.reply("251", ":There are 1 users and 0 services on 1 servers")
        self.reply("375", f":- {self.server} Message of the Day -")
        self.reply("372", ":- Welcome. Be nice.")
        self.reply("376", ":End of MOTD command.")

    def registered_command(self, command: str, params: list[str]) -> None:
        arg = params[0] if params else ""
        if command == "JOIN":
            if arg == "0":
                for channel in sorted(self.channels):
                    self.send(f":{self.mask} PART {channel}")
                self.channels.clear()
                return
            keys = params[1].split(",") if len(params) > 1 else []
            for i, channel in enumerate(c for c in arg.split(",") if c):
                self.channels.add(channel)
                self.log("JOIN", channel=channel[:64], **({"key": keys[i][:64]} if i < len(keys) else {}))
                self.send(f":{self.mask} JOIN {channel}")
                self.reply("353", f"= {channel} :@{self.nick}")
                self.reply("366", f"{channel} :End of NAMES list.")
        elif command == "PART":
            for channel in arg.split(","):
                self.channels.discard(channel)
                self.send(f":{self.mask} PART {channel}")
        elif command in ("PRIVMSG", "NOTICE"):
            self.log(command, target=arg[:64], text=(params[1] if len(params) > 1 else "")[:2048])
        elif command == "MODE":
            if arg.startswith(("#", "&")):
                self.reply("324", f"{arg} +nt")
            else:
                self.reply("221", "+i")
        elif command == "TOPIC":
            self.reply("331", f"{arg} :No topic is set")
        elif command == "NAMES":
            self.reply("366", f"{arg} :End of NAMES list.")
        elif command in ("WHO", "WHOIS"):
            self.reply("315" if command == "WHO" else "318", f"{arg} :End of {command} list.")
        elif command == "USERHOST":
            self.reply("302", f":{self.nick}=+{self.user}@{self.host}")
        elif command == "ISON":
            self.reply("303", ":")
        elif command == "MOTD":
            self.reply("422", ":MOTD File is missing")
        else:
            self.reply("421", f"{command} :Unknown command")


async def serve(stream, emit, base: dict, server: str, host: str) -> None:
    """`host`: the client's address, as the server shows it in the client's mask."""
    await Session(stream, emit, base, server, host).run()
