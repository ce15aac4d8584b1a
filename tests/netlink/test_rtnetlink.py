"""rtnetlink: this namespace's addresses and devices, as the kernel dumps them."""

from __future__ import annotations

import json
import socket

import pytest

from conftest import REPO
from nftdivert.netlink import rtnetlink

SCRIPT = """
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from nftdivert.netlink import rtnetlink
print(json.dumps({"addresses": [[a.family, a.prefix, a.flags & 0x01, a.index, socket.inet_ntop(a.family, a.address)]
                                for a in rtnetlink.interface_addresses()],
                  "links": [[l.index, l.name, l.kind, l.master, l.address.hex()] for l in rtnetlink.links()]}))
"""


@pytest.mark.kernel
def test_addresses_and_devices_of_a_namespace(host):
    host.run("ip", "link", "add", "br9", "type", "bridge")
    host.run("ip", "link", "add", "p9", "address", "02:00:00:00:00:09", "type", "veth", "peer", "name", "q9")
    host.run("ip", "link", "set", "p9", "master", "br9")
    host.run("ip", "addr", "add", "192.0.2.1/24", "dev", "p9")
    host.run("ip", "addr", "add", "192.0.2.9/24", "dev", "p9")  # the same prefix again: secondary
    host.run("ip", "addr", "add", "2001:db8:1::1/64", "dev", "p9", "nodad")
    out = json.loads(host.run("python3", "-c", SCRIPT, str(REPO)).stdout)
    links = {name: (index, kind, master, mac) for index, name, kind, master, mac in out["links"]}
    assert links["lo"][1] == "" and links["br9"][1] == "bridge" and links["p9"][1] == "veth"
    index = links["p9"][0]
    assert links["p9"][2:] == (links["br9"][0], "020000000009")
    assert [a for a in out["addresses"] if a[3] == index] == [
        [socket.AF_INET, 24, 0, index, "192.0.2.1"],
        [socket.AF_INET, 24, 1, index, "192.0.2.9"],
        [socket.AF_INET6, 64, 0, index, "2001:db8:1::1"],
    ]


def test_links_of_this_namespace_are_read():
    names = {link.name for link in rtnetlink.links()}
    assert "lo" in names
