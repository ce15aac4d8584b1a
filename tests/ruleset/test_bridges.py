"""Which bridges are on the client side, and the commands that fill the bridge table's map (pure)."""

from __future__ import annotations

import pytest

from nftdivert.ruleset import bridges
from nftdivert.netlink.rtnetlink import Link
from nftdivert.ruleset.bridges import Bridge

MAC = bytes.fromhex("02aabbccdd01")
LINKS = [
    Link(1, "lo", "", 0, bytes(6)),
    Link(2, "lan0", "bridge", 0, MAC),
    Link(3, "p1", "veth", 2, bytes.fromhex("02000000000a")),
    Link(4, "p0", "veth", 2, bytes.fromhex("02000000000b")),
    Link(5, "wan0", "bridge", 0, bytes.fromhex("02aabbccdd02")),
    Link(6, "eth1", "", 5, bytes.fromhex("02000000000c")),
    Link(7, "tap9", "tun", 0, b""),  # on no bridge
    Link(8, "wg0", "bridge", 0, b""),  # no Ethernet address: nothing to give the frames
]


def test_every_bridge_is_on_the_client_side_without_interfaces():
    assert bridges.client_bridges(LINKS, ()) == [
        Bridge("lan0", "02:aa:bb:cc:dd:01", ((3, "p1"), (4, "p0"))),
        Bridge("wan0", "02:aa:bb:cc:dd:02", ((6, "eth1"),)),
    ]


@pytest.mark.parametrize("interfaces, names", [(("lan0",), ["lan0"]), (("lan*", "eth1"), ["lan0"]),
                                               (("w*",), ["wan0"]), (("p0", "eth1"), [])])
def test_interfaces_choose_bridges_by_their_own_names(interfaces, names):
    assert [b.name for b in bridges.client_bridges(LINKS, interfaces)] == names


def test_map_commands_name_ports_by_index():
    found = bridges.client_bridges(LINKS, ())
    assert bridges.map_commands("lab", found) == (
        "flush map bridge lab client_ports\n"
        "flush set bridge lab client_port_indexes\n"
        "add element bridge lab client_ports { 3 : 02:aa:bb:cc:dd:01, 4 : 02:aa:bb:cc:dd:01, "
        "6 : 02:aa:bb:cc:dd:02 }\n"
        "add element bridge lab client_port_indexes { 3, 4, 6 }\n")
    assert bridges.map_commands("lab", []) == ("flush map bridge lab client_ports\n"
                                               "flush set bridge lab client_port_indexes\n")
