"""[[profiles]]: which answers a client gets by its address, and what the config refuses."""

from __future__ import annotations

import ipaddress

import pytest

from nftdivert.config import ConfigError, load
from nftdivert.profiles import Profiles, profile_for

GOOD = '''
[dns]
one_address = "198.51.100.1"
txt = "top"

[http]
body = "top-level"

[[profiles]]
name = "family-a"
clients = ["192.0.2.0/24", "2001:db8:1::/64"]
dns = { one_address = "203.0.113.7" }
http = { body = "scripted C2" }
leave_alone = { tcp_ports = [443] }

[[profiles]]
name = "one-vm"
clients = ["192.0.2.23/32"]
dns = { one_address = "", records = [{ name = "c2.example", type = "A", value = "203.0.113.99" }] }
custom = [{ protocol = "tcp", ports = [4444], static = "hello" }]
'''


def _load(tmp_path, text: str):
    path = tmp_path / "profiles.toml"
    path.write_text(text)
    return load(path)


def test_the_longest_prefix_wins_and_others_get_the_top_level_answers(tmp_path):
    config = _load(tmp_path, GOOD)
    profiles = Profiles(config)
    assert profiles.profile_for("192.0.2.23").profile == "one-vm"
    assert profiles.profile_for("192.0.2.24").profile == "family-a"
    assert profiles.profile_for("::ffff:192.0.2.24").profile == "family-a"  # the dual-stack socket's view
    assert profiles.profile_for(ipaddress.ip_address("2001:db8:1::5")).profile == "family-a"
    for outside in ("198.51.100.5", "2001:db8:2::5", "not an address", None):
        assert profiles.profile_for(outside) is profiles.default
    assert profile_for(config, "192.0.2.24") == profiles.profile_for("192.0.2.24")


def test_a_profile_section_is_the_top_level_one_with_its_keys_over_it(tmp_path):
    config = _load(tmp_path, GOOD)
    a, vm, top = (profile_for(config, c) for c in ("192.0.2.5", "192.0.2.23", "198.51.100.5"))
    assert (a.dns.one_address, a.dns.txt, a.http.body) == ("203.0.113.7", "top", "scripted C2")
    assert a.custom == () and [str(r) for r in a.tcp_ports] == ["443"]
    assert vm.dns.one_address == "" and vm.dns.records[0].value == "203.0.113.99"
    assert vm.http.body == "top-level" and vm.custom[0].payload() == b"hello" and vm.tcp_ports == ()
    assert (top.profile, top.dns.one_address, top.http.body) == (None, "198.51.100.1", "top-level")


PROFILE = '[[profiles]]\nname = "{}"\ndns = {{ {} }}\n'
BAD = [
    pytest.param('[[profiles]]\nname = "a"\nclients = ["10.0.1.5/24"]\n', "profiles[0].clients[0]", "host bits set",
                 id="host-bits"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["10.0.1.0/33"]\n', "profiles[0].clients[0]", "10.0.1.0/33",
                 id="bad-prefix"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\n[[profiles]]\nname = "b"\n'
                 'clients = ["10.0.0.0/8", "192.0.2.0/24"]\n', "profiles[1].clients[1]", "profiles[0] has this prefix",
                 id="equal-prefix"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\ncolour = 1\n', "profiles[0].colour",
                 "unknown key", id="unknown-key"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\nhttp = { colour = 1 }\n',
                 "profiles[0].http.colour", "unknown key", id="unknown-section-key"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\ndns = { answer_v4 = "198.18.0.0/16" }\n',
                 "profiles[0].dns.answer_v4", "overlaps dns.answer_v4 198.18.0.0/15", id="pool-inside-the-top-level"),
    pytest.param('[dns]\nanswer_v4 = "198.18.0.0/16"\n' + PROFILE.format("a", 'answer_v4 = "198.19.0.0/16"')
                 + PROFILE.format("b", 'answer_v4 = "198.19.128.0/17"'),
                 "profiles[1].dns.answer_v4", "overlaps profiles[0].dns.answer_v4 198.19.0.0/16", id="pools-overlap"),
    pytest.param('[dns]\nanswer_v4 = "198.18.0.0/16"\n' + PROFILE.format("a", 'pool_key = "k"'),
                 "profiles[0].dns.pool_key", "dns.answer_v4 is its 198.18.0.0/16 too, with pool_key ''",
                 id="one-network-two-keys"),
    pytest.param('[dns]\nanswer_v4 = "198.18.0.0/16"\n' + PROFILE.format("a", 'answer_v4 = "198.19.0.0/16"')
                 + PROFILE.format("b", 'answer_v4 = "198.19.0.0/16", max_names = 9'),
                 "profiles[1].dns.max_names", "profiles[0].dns.answer_v4 is its 198.19.0.0/16 too, with max_names",
                 id="one-network-two-sizes"),
    pytest.param('[dns]\nanswer_v4 = "198.18.0.0/16"\nrecords = [{ name = "c2.example", type = "A", value = '
                 '"198.19.0.5" }]\n' + PROFILE.format("a", 'answer_v4 = "198.19.0.0/16"'),
                 "profiles[0].dns.answer_v4", "holds the fixed address 198.19.0.5 of dns.records", id="pool-holds-record"),
    pytest.param('[dns]\nanswer_v4 = "198.18.0.0/16"\n' + PROFILE.format("a", 'answer_v4 = "198.19.0.0/16"')
                 + PROFILE.format("b", 'one_address = "198.19.1.1"'),
                 "profiles[0].dns.answer_v4", "holds the fixed address 198.19.1.1 of profiles[1].dns.one_address",
                 id="pool-holds-another-profiles-one-address"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\ndns = { one_address = "nope" }\n',
                 "profiles[0].dns.one_address", "not an IP address", id="dns-value"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\nleave_alone = { hosts = [] }\n',
                 "profiles[0].leave_alone.hosts", "unknown key", id="leave-alone-hosts"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\nleave_alone = { tcp_ports = [0] }\n',
                 "profiles[0].leave_alone.tcp_ports[0]", "ports are 1-65535", id="leave-alone-port"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\ncustom = [{ protocol = "tcp" }]\n',
                 "profiles[0].custom[0].static", "exactly one", id="custom"),
    pytest.param('[[profiles]]\nclients = ["192.0.2.0/24"]\n', "profiles[0].name", "missing", id="no-name"),
    pytest.param('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24"]\n[[profiles]]\nname = "a"\n'
                 'clients = ["192.0.3.0/24"]\n', "profiles[1].name", "profiles[0] has this name", id="same-name"),
]


@pytest.mark.parametrize("toml, key, reason", BAD)
def test_a_bad_profile_names_key_value_and_why(tmp_path, toml, key, reason):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, toml)
    assert info.value.key == key, str(info.value)
    assert reason in str(info.value), str(info.value)
    assert str(info.value).startswith(f"{key} = ")


def test_a_bad_profile_exits_2_in_one_line(tmp_path):
    import subprocess

    from conftest import nftdivert_argv

    path = tmp_path / "bad.toml"
    path.write_text('[[profiles]]\nname = "a"\nclients = ["192.0.2.0/24", "192.0.2.0/24"]\n')
    proc = subprocess.run(nftdivert_argv("render", "-c", str(path)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "profiles[0].clients[1]" in proc.stderr and "Traceback" not in proc.stderr


def test_the_dns_listener_answers_each_question_by_its_clients_profile(tmp_path):
    import dns.message

    from nftdivert.services.dns import Resolver

    config = _load(tmp_path, GOOD)
    asked: list[tuple] = []
    resolver = Resolver.from_config(config.dns, on_question=lambda *q: asked.append(q))
    resolver.set_answers(Profiles(config))

    def a(client: str, name: str = "c2.example") -> list[str]:
        reply = dns.message.from_wire(resolver.answer(dns.message.make_query(name, "A").to_wire(), client))
        return [rd.to_text() for rrset in reply.answer for rd in rrset]

    assert a("192.0.2.23:5353") == ["203.0.113.99"]  # its own record
    assert ipaddress.ip_address(a("192.0.2.23:5353", "other.example")[0]) in config.dns.pools()[0]  # and the pool for the rest
    assert a("192.0.2.24:5353") == ["203.0.113.7"]
    assert a("[2001:db8:1::5]:5353") == ["203.0.113.7"]
    assert a("198.51.100.5:5353") == ["198.51.100.1"]
    # Each question's record names the profile whose answers it got.
    assert [q[-1] for q in asked] == ["one-vm", "one-vm", "family-a", "family-a", None]


POOLS = '''
[dns]
answer_v4 = "198.18.0.0/16"
ttl = 60

[[profiles]]
name = "family-a"
clients = ["192.0.2.0/25"]
dns = { answer_v4 = "198.19.0.0/17", answer_v6 = "2001:db8:a::/64", max_names = 1000 }

[[profiles]]
name = "family-a-too"              # the same networks: the same pools
clients = ["192.0.2.128/25"]
dns = { answer_v4 = "198.19.0.0/17", answer_v6 = "2001:db8:a::/64", max_names = 1000, txt = "too" }

[[profiles]]
name = "keyed"                     # its own key: its own networks
clients = ["198.51.100.0/24"]
dns = { answer_v4 = "198.19.128.0/17", answer_v6 = "2001:db8:b::/64", pool_key = "lab-b", ttl = 5 }
'''


def _asker(resolver):
    import dns.message

    def ask(client: str, name: str, qtype: str = "A") -> tuple[str, int]:
        reply = dns.message.from_wire(resolver.answer(dns.message.make_query(name, qtype).to_wire(), client))
        return reply.answer[0][0].to_text(), reply.answer[0].ttl
    return ask


def test_each_profile_answers_from_its_own_pools_and_every_address_names_its_name(tmp_path):
    from nftdivert.services.dns import Resolver
    from nftdivert.services.names import AnswerPool

    config = _load(tmp_path, POOLS)
    assigned: list[tuple] = []
    resolver = Resolver.from_config(config.dns, on_assign=lambda *a: assigned.append(a))
    resolver.set_answers(Profiles(config))
    ask = _asker(resolver)
    top, a, too, keyed = (ask(client, "c2.example") for client in
                          ("203.0.113.9:1", "192.0.2.1:1", "192.0.2.200:1", "198.51.100.7:1"))
    net = ipaddress.ip_network
    assert ipaddress.ip_address(top[0]) in net("198.18.0.0/16") and top[1] == 60
    assert ipaddress.ip_address(a[0]) in net("198.19.0.0/17") and a == too  # one pool: one address for the name
    # Keyed: the address any pool of that network and key gives the name (another run, another gateway).
    assert keyed == (str(AnswerPool(net("198.19.128.0/17"), key="lab-b").address_for("c2.example")), 5)
    assert ipaddress.ip_address(ask("[2001:db8:1::5]:1", "c2.example", "AAAA")[0]) in net("2001:db8:53::/64")
    assert ipaddress.ip_address(ask("192.0.2.1:1", "c2.example", "AAAA")[0]) in net("2001:db8:a::/64")
    # Each address names the name it was given, whichever pool, for the log and for PTR; every pool reports.
    for address, _ in (top, a, keyed):
        assert resolver.name_for(ipaddress.ip_address(address)) == "c2.example"
        assert ask("203.0.113.9:1", ipaddress.ip_address(address).reverse_pointer, "PTR")[0] == "c2.example."
    assert {str(address) for address, _, _ in assigned} >= {top[0], a[0], keyed[0]}
    assert len(resolver.pools) == 6


def test_a_client_whose_task_chose_a_profile_gets_its_pools_addresses_and_the_old_ones_still_name(tmp_path):
    import time

    from nftdivert import tasks
    from nftdivert.services.dns import Resolver

    config = _load(tmp_path, POOLS)
    resolver = Resolver.from_config(config.dns)
    profiles = Profiles(config)
    resolver.set_answers(profiles)
    ask = _asker(resolver)
    before = ask("203.0.113.9:1", "c2.example")[0]
    profiles.chosen = tasks.TaskTable().started("t1", (ipaddress.ip_network("203.0.113.9/32"),), time.time() - 1,
                                                profile="keyed")
    during = ask("203.0.113.9:1", "c2.example")[0]
    assert ipaddress.ip_address(before) in ipaddress.ip_network("198.18.0.0/16")
    assert ipaddress.ip_address(during) in ipaddress.ip_network("198.19.128.0/17")
    assert {resolver.name_for(ipaddress.ip_address(a)) for a in (before, during)} == {"c2.example"}


def test_a_reload_keeps_each_networks_pool_and_its_names(tmp_path):
    from nftdivert.services.dns import Resolver

    config = _load(tmp_path, POOLS)
    resolver = Resolver.from_config(config.dns)
    resolver.set_answers(Profiles(config))
    ask = _asker(resolver)
    before = ask("192.0.2.1:1", "c2.example")
    renamed = _load(tmp_path, POOLS.replace('"family-a"', '"family-a-renamed"').replace(', txt = "too"', ""))
    resolver.set_answers(Profiles(renamed))
    assert ask("192.0.2.1:1", "c2.example") == before  # the renamed profile's pool is the one it had
    assert len(resolver.pools) == 6


def test_a_reload_may_not_bring_a_profile_a_pool_the_run_has_not(tmp_path):
    from nftdivert.runner import not_reloadable

    running = _load(tmp_path, POOLS)
    same = POOLS.replace('"family-a"', '"renamed"')
    assert not_reloadable(running, _load(tmp_path, same)) == []
    assert not_reloadable(running, _load(tmp_path, POOLS.split("[[profiles]]")[0])) == []  # profiles gone: fine
    assert not_reloadable(running, _load(tmp_path, POOLS.replace('"lab-b"', '"lab-c"'))) \
        == ["profiles[2].dns.answer_v4", "profiles[2].dns.answer_v6"]
    assert not_reloadable(running, _load(tmp_path, POOLS.replace("2001:db8:b::/64", "2001:db8:c::/64"))) \
        == ["profiles[2].dns.answer_v6"]


def test_the_naming_history_holds_every_pools_names(tmp_path):
    from nftdivert.services.listener_process import ListenerProcess

    config = _load(tmp_path, POOLS)
    # [dns]'s two pools, family-a's two (shared), keyed's two: each its names and as many freed.
    assert ListenerProcess(config)._names.max_addresses == 2 * (2 * 131072 + 2 * 1000 + 2 * 131072)


def test_the_listeners_records_name_the_profile_that_answers_the_client(tmp_path):
    from nftdivert.services import custom

    served = custom.serving(Profiles(_load(tmp_path, GOOD)))
    assert served("192.0.2.23").fields() == {"profile": "one-vm"}
    assert served("::ffff:192.0.2.24").fields() == {"profile": "family-a"}
    assert served("198.51.100.5").fields() == {}  # the top-level answers: no profile


def test_the_ports_a_profile_leaves_alone_cover_its_prefixes_less_the_longer_ones_inside(tmp_path):
    from nftdivert.ruleset import client_sets

    config = _load(tmp_path, '''
[[profiles]]
name = "lab"
clients = ["192.0.2.0/24", "2001:db8:1::/64"]
leave_alone = { tcp_ports = [443, "8000-8100", 8050, 8101], udp_ports = [53] }

[[profiles]]
name = "vm"
clients = ["192.0.2.16/28"]
''')
    found = client_sets.elements(config)
    v4 = {element.split(" . ")[0] for element in found["tcp", 4]}
    assert v4 == {"192.0.2.0/28", "192.0.2.32/27", "192.0.2.64/26", "192.0.2.128/25"}  # all but the vm's /28
    assert found["tcp", 6] == ("2001:db8:1::/64 . 443", "2001:db8:1::/64 . 8000-8101")  # merged, no overlap
    assert len(found["udp", 4]) == 4 and found["udp", 6] == ("2001:db8:1::/64 . 53",)
    commands = client_sets.set_commands("nftdivert", config)
    assert "flush set inet nftdivert profile_alone_udp_v6\n" in commands
    assert "add element inet nftdivert profile_alone_udp_v6 { 2001:db8:1::/64 . 53 }\n" in commands


def test_a_reload_may_change_the_profiles(tmp_path):
    from nftdivert.runner import not_reloadable

    running = _load(tmp_path, GOOD)
    assert not_reloadable(running, _load(tmp_path, GOOD.replace("443", "8443").replace("scripted C2", "v2"))) == []
    assert not_reloadable(running, _load(tmp_path, "")) == ["dns"]  # the top-level txt: as before, not reloadable


def test_a_clients_hooks_are_its_profiles(tmp_path):
    import queue

    from nftdivert.observers.hooks import Hooks

    config = _load(tmp_path, '[hooks]\nfirst_conversation = ["echo", "top", "{client_address}"]\n'
                             '[[profiles]]\nname = "quiet"\nclients = ["192.0.2.0/24"]\nhooks = { first_conversation = [] }\n'
                             '[[profiles]]\nname = "loud"\nclients = ["2001:db8:1::/64"]\n'
                             'hooks = { first_conversation = ["echo", "loud", "{client_address}"] }\n')
    profiles, got = Profiles(config), queue.Queue()
    hooks = Hooks(config.hooks, got.put, lambda address: profiles.profile_for(address).hooks)
    for client in ("192.0.2.2:1", "[2001:db8:1::2]:1", "198.51.100.2:1"):
        hooks.seen({"event": "start", "client": client})
    outputs = sorted(got.get(timeout=30)["output"] for _ in range(2))
    hooks.close()
    assert outputs == ["loud 2001:db8:1::2\n", "top 198.51.100.2\n"] and got.empty()  # none for the quiet one


TASK_ONLY = GOOD + '''
[[profiles]]
name = "sinkhole"                  # no clients: only a task chooses it
http = { body = "sinkholed" }
leave_alone = { tcp_ports = [8081] }
'''


def test_a_task_that_chose_a_profile_wins_over_the_address_while_it_runs(tmp_path):
    from nftdivert import tasks

    config = _load(tmp_path, TASK_ONLY)
    assert config.profiles[2].clients == ()
    profiles = Profiles(config)
    vm, outside = ipaddress.ip_network("192.0.2.23/32"), ipaddress.ip_network("198.51.100.0/24")
    profiles.chosen = (tasks.TaskTable().started("t1", (vm, outside), 10.0, profile="sinkhole")
                       .ended("t1", 20.0).started("t2", (outside,), 30.0))
    assert profiles.profile_for("192.0.2.23", 5.0).profile == "one-vm"  # before: its address's
    assert profiles.profile_for("::ffff:192.0.2.23", 15.0).profile == "sinkhole"
    assert profiles.profile_for("198.51.100.5", 15.0).http.body == "sinkholed"  # in no address's profile
    assert profiles.profile_for("192.0.2.23", 25.0).profile == "one-vm"  # after: its address's again
    assert profiles.profile_for("198.51.100.5", 35.0) is profiles.default  # a task that chose none
    assert profiles.profile_for("192.0.2.24", 15.0).profile == "family-a"  # not its client
    del profiles.answers["sinkhole"]  # a profile gone (a reload cannot do it while the task runs): its address's
    assert profiles.profile_for("192.0.2.23", 15.0).profile == "one-vm"


def test_the_ports_left_alone_follow_the_profile_a_task_chose(tmp_path):
    from nftdivert.ruleset import client_sets

    config = _load(tmp_path, TASK_ONLY)
    net = ipaddress.ip_network

    def ports(found: dict, address: str) -> list[str]:
        """The ports left alone for `address`: those of the one element that holds it, if any."""
        return [element.split(" . ")[1] for element in found["tcp", 4]
                if ipaddress.ip_address(address) in net(element.split(" . ")[0])]

    before = client_sets.elements(config)
    assert [ports(before, a) for a in ("192.0.2.5", "192.0.2.23", "192.0.2.200")] == [["443"], [], ["443"]]
    # A task's /32 inside family-a's /24 takes it from there; its /25 also beats one-vm's longer /32.
    found = client_sets.elements(config, ((net("192.0.2.5/32"), "sinkhole"), (net("192.0.2.0/25"), "sinkhole")))
    assert [ports(found, a) for a in ("192.0.2.5", "192.0.2.23", "192.0.2.100", "192.0.2.200")] \
        == [["8081"], ["8081"], ["8081"], ["443"]], found
    # A task that chose none (the later start: first) leaves its clients to their addresses.
    found = client_sets.elements(config, ((net("192.0.2.5/32"), None), (net("192.0.2.0/25"), "sinkhole")))
    assert [ports(found, a) for a in ("192.0.2.5", "192.0.2.23", "192.0.2.100", "192.0.2.200")] \
        == [["443"], ["8081"], ["8081"], ["443"]], found
    commands = client_sets.set_commands("nftdivert", config, ((net("2001:db8:1::a/128"), "sinkhole"),))
    assert "2001:db8:1::a/128 . 8081" in commands and "2001:db8:1::/64 . 443" not in commands, commands


def test_the_addresses_that_stand_for_names_are_every_profiles_too(tmp_path):
    named = {str(net) for net in Profiles(_load(tmp_path, GOOD)).named}
    # The pools, the top-level one_address, family-a's, one-vm's fixed record: the log names conversations to them.
    assert named == {"198.18.0.0/15", "2001:db8:53::/64", "198.51.100.1/32", "203.0.113.7/32", "203.0.113.99/32"}
