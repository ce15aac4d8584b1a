"""Bound-port discovery from /proc/net and the nft commands that mirror it."""

import socket

from nftdivert import bound


def test_listening_tcp_and_bound_udp_ports_are_found_both_families():
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as t, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as not_listening:
        t.bind(("::", 0))
        t.listen()
        u.bind(("127.0.0.1", 0))
        not_listening.bind(("127.0.0.1", 0))
        ports = bound.read()
        assert t.getsockname()[1] in ports.tcp
        assert u.getsockname()[1] in ports.udp
        assert not_listening.getsockname()[1] not in ports.tcp  # bound, but nobody accepts there


def test_set_commands_replace_the_sets_in_one_go():
    text = bound.set_commands("lab", bound.BoundPorts(tcp=frozenset({443, 22}), udp=frozenset()))
    assert text.splitlines() == [
        "flush set inet lab bound_tcp_ports",
        "add element inet lab bound_tcp_ports { 22, 443 }",
        "flush set inet lab bound_udp_ports",
    ]
