"""pool_channel: another listener process's questions to the DNS pool's owner, over a real socket pair."""

from __future__ import annotations

import asyncio
import ipaddress
import pickle
import socket
import threading

import dns.message

from nftdivert.config import DnsConfig
from nftdivert.services import pool_channel
from nftdivert.services.dns import Resolver


def _owner(resolver, sock):
    """The owner's loop in a thread, answering `sock`; returns a call that stops it."""
    loop = asyncio.new_event_loop()
    owner = pool_channel.Owner(loop, resolver, [sock])
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(owner.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return stop


def test_the_remote_gets_the_owners_answers_and_names():
    resolver = Resolver.from_config(DnsConfig(answer_v4="198.18.0.0/16"))
    owners_end, askers_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop = _owner(resolver, owners_end)
    remote = pool_channel.Remote(askers_end)
    try:
        wire = remote.answer(dns.message.make_query("far.example", "A").to_wire(), "192.0.2.1:5000")
        address = ipaddress.ip_address(str(dns.message.from_wire(wire).answer[0][0]))
        assert remote.name_for(address) == "far.example" == resolver.name_for(address)
        assert remote.name_for(ipaddress.ip_address("203.0.113.9")) is None
        assert remote.answer(b"not dns") is None and remote.unanswered == 0  # the owner's None, not a failure
    finally:
        stop()
        remote.close()


def test_a_silent_or_gone_owner_answers_none_and_is_counted():
    owners_end, askers_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    remote = pool_channel.Remote(askers_end, timeout=0.2)
    assert remote.name_for(ipaddress.ip_address("198.18.0.1")) is None  # nobody reads: the timeout
    assert remote.unanswered == 1
    # Its late answer to that question is passed over; the next question gets its own.
    number, _method, _args = pickle.loads(owners_end.recv(1 << 16))
    owners_end.send(pickle.dumps((number, "late.example")))
    stop = _owner(Resolver.from_config(DnsConfig(answer_v4="198.18.0.0/16")), owners_end)
    try:
        assert remote.name_for(ipaddress.ip_address("198.18.0.1")) is None and remote.unanswered == 1
    finally:
        stop()
    assert owners_end.fileno() < 0  # closed: the owner is gone
    assert remote.answer(dns.message.make_query("x.example", "A").to_wire()) is None
    assert remote.unanswered == 2
    remote.close()


def test_the_remote_gets_the_asking_clients_profiles_pool(tmp_path):
    """DoH in another process: the owner answers from the pool of the client's profile, and names
    an address from any pool."""
    from nftdivert.config import load
    from nftdivert.profiles import Profiles

    path = tmp_path / "pools.toml"
    path.write_text('[dns]\nanswer_v4 = "198.18.0.0/16"\n[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\n'
                    'dns = { answer_v4 = "198.19.0.0/16", answer_v6 = "2001:db8:a::/64" }\n')
    config = load(path)
    resolver = Resolver.from_config(config.dns)
    resolver.set_answers(Profiles(config))
    owners_end, askers_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stop = _owner(resolver, owners_end)
    remote = pool_channel.Remote(askers_end)
    try:
        got = {}
        for client in ("192.0.2.1:5000", "198.51.100.1:5000"):
            wire = remote.answer(dns.message.make_query("far.example", "A").to_wire(), client)
            got[client] = ipaddress.ip_address(str(dns.message.from_wire(wire).answer[0][0]))
        assert got["192.0.2.1:5000"] in ipaddress.ip_network("198.19.0.0/16"), got
        assert got["198.51.100.1:5000"] in ipaddress.ip_network("198.18.0.0/16"), got
        assert {remote.name_for(address) for address in got.values()} == {"far.example"}
    finally:
        stop()
        remote.close()
