"""The small pure parts around the observer: interfaces, the sysctls."""

from __future__ import annotations

import ipaddress

from nftdivert.observers import ctsettings, links

SUBNETS = [(ipaddress.ip_network("192.0.2.0/24"), "eth1", ipaddress.ip_address("192.0.2.1").packed),
           (ipaddress.ip_network("192.0.2.128/25"), "eth2", ipaddress.ip_address("192.0.2.129").packed),
           (ipaddress.ip_network("2001:db8:1::/64"), "eth1", ipaddress.ip_address("2001:db8:1::1").packed)]


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_the_interface_is_the_longest_prefix_holding_the_client():
    assert links.interface_for(_packed("192.0.2.7"), SUBNETS) == "eth1"
    assert links.interface_for(_packed("192.0.2.200"), SUBNETS) == "eth2"
    assert links.interface_for(_packed("2001:db8:1::2"), SUBNETS) == "eth1"
    assert links.interface_for(_packed("192.0.2.129"), SUBNETS) == "lo"  # our own address: local mode
    assert links.interface_for(_packed("203.0.113.5"), SUBNETS) == ""  # routed to us: no subnet of ours


def test_accounting_is_turned_on_and_restored_whatever_happens(tmp_path):
    acct, stamp, absent = tmp_path / "acct", tmp_path / "stamp", tmp_path / "absent"
    acct.write_text("0\n")
    stamp.write_text("1\n")
    try:
        with ctsettings.accounting((acct, stamp, absent)) as before:
            assert before == {acct: "0", stamp: "1"}
            assert acct.read_text() == stamp.read_text() == "1\n"
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert acct.read_text() == "0\n" and stamp.read_text() == "1\n" and not absent.exists()
