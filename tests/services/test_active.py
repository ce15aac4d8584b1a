"""Active FTP's data connection between two real namespaces: from the address asked for, port 20."""

from __future__ import annotations

import subprocess
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


# Makes the rule of one family (argv[2]) as a listener process does, holds it until stdin closes.
HOLD = r"""
import subprocess
import sys
sys.path.insert(0, sys.argv[1])
from nftdivert.services import active
active._route(sys.argv[2])
print("held", flush=True)
sys.stdin.read()
active.unroute()
"""
STALE = r"""
import subprocess
import sys
sys.path.insert(0, sys.argv[1])
from nftdivert.services import active
print(active.remove_stale())
"""


def _rules(ns, family: str) -> int:
    return ns.run("ip", family, "rule", "list", "priority", "2020").stdout.count("lookup 2020")


def test_two_listener_processes_make_one_family_each_and_a_killed_makers_rule_goes_as_stale():
    """Several listener processes: the first active transfer of each family may
    come to a different one; each family's rule is made by whoever needs it
    first. A killed maker's rule is stale (`remove_stale`), a live one's is not."""
    div = netns.create("div")
    holders = []
    try:
        for family in ("-6", "-4"):
            holders.append(div.popen(sys.executable, "-c", HOLD, str(REPO), family, text=True,
                                     stdin=subprocess.PIPE))
            assert holders[-1].stdout.readline() == "held\n"
        assert (_rules(div, "-6"), _rules(div, "-4")) == (1, 1)
        six, four = holders
        six.kill()
        six.wait(timeout=10)
        assert div.run(sys.executable, "-c", STALE, str(REPO), timeout=30).stdout.split() == ["True"]
        assert (_rules(div, "-6"), _rules(div, "-4")) == (0, 1)  # the live maker's stays
        four.stdin.close()
        four.wait(timeout=10)
        assert (_rules(div, "-6"), _rules(div, "-4")) == (0, 0)
        assert div.run(sys.executable, "-c", STALE, str(REPO), timeout=30).stdout.split() == ["False"]
    finally:
        for p in holders:
            p.kill()
            p.wait(timeout=10)
        div.delete()
