"""Active FTP's data connection between two real namespaces: from the address asked for, port 20."""

from __future__ import annotations

import sys

import netns
from conftest import REPO

# Inside the "diverter": connect to the client from an address it does not own, then undo the route.
CONNECT = r"""
import asyncio, subprocess, sys
sys.path.insert(0, sys.argv[1])
from nftdivert.services import active

async def main():
    stream, end = await active.connect("198.51.100.25", ("169.254.61.2", 5021))
    stream.write(b"data")
    await stream.drain()
    await end()

asyncio.run(main())
print(subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout.count("lookup 2020"))
active.unroute()
print(subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout.count("lookup 2020"))
"""

ACCEPT = r"""
import socket
s = socket.create_server(("0.0.0.0", 5021))
print("listening", flush=True)
c, peer = s.accept()
print(peer[0], peer[1], c.recv(100).decode(), flush=True)
"""


def test_the_data_connection_comes_from_the_address_asked_for_and_the_route_goes():
    diverter, client = netns.create("div"), netns.create("cli")
    try:
        netns.link(diverter, "hm-d", ["169.254.61.1/30"], client, "hm-c", ["169.254.61.2/30"])
        client.run("ip", "route", "add", "default", "via", "169.254.61.1")
        server = client.popen(sys.executable, "-c", ACCEPT, text=True)
        assert server.stdout.readline() == "listening\n"
        out = diverter.run(sys.executable, "-c", CONNECT, str(REPO), timeout=30).stdout.split()
        assert out == ["1", "0"]  # the rule while it served, none after
        assert server.communicate(timeout=10)[0].split() == ["198.51.100.25", "20", "data"]
    finally:
        client.delete()
        diverter.delete()
