"""The config: every bad value is refused with the key that holds it; good ones load.

The BAD table is the heart of this module: one TOML text per mistake, the key
the ConfigError must name and a fragment of its reason. Nothing here needs
root or a kernel.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
import textwrap

import pytest

from nftdivert import config as config_mod
from nftdivert.config import Config, Listener, PortRange, QueueConfig, WorkerConfig, from_mapping, load
from nftdivert.errors import ConfigError

from conftest import REPO

TCP_LISTENER = '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 80\n'


def case(id_: str, toml: str, key: str, reason: str):
    return pytest.param(textwrap.dedent(toml), key, reason, id=id_)


BAD = [
    # --- unknown keys ---------------------------------------------------------
    case("unknown-top-level", 'modes = "gateway"\n', "modes", "unknown key"),
    case("unknown-in-queue", "[queue]\nspeed = 3\n", "queue.speed", "unknown key"),
    case("unknown-in-leave-alone", '[leave_alone]\nports = [22]\n', "leave_alone.ports", "unknown key"),
    case("unknown-in-worker", "[worker]\nthreads = 4\n", "worker.threads", "unknown key"),
    case("unknown-in-listener", TCP_LISTENER + 'colour = "red"\n', "listeners[0].colour", "unknown key"),
    case("listener-missing-port", '[[listeners]]\nname = "t"\nprotocol = "tcp"\n', "listeners[0].port", "missing"),
    # --- wrong types ------------------------------------------------------------
    case("port-as-string", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = "80"\n',
         "listeners[0].port", "not str"),
    case("port-as-bool", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = true\n',
         "listeners[0].port", "boolean"),
    case("port-as-float", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 80.0\n',
         "listeners[0].port", "not float"),
    case("table-as-list", 'table = ["nftdivert"]\n', "table", "not list"),
    case("ipv4-as-string", 'ipv4 = "yes"\n', "ipv4", "true or false"),
    case("interfaces-as-string", 'interfaces = "eth0"\n', "interfaces", "a list"),
    case("interface-as-int", "interfaces = [0]\n", "interfaces[0]", "not int"),
    case("leave-alone-not-a-table", "leave_alone = 5\n", "leave_alone", "a table"),
    case("listeners-not-a-list", '[listeners]\nname = "t"\n', "listeners", "a list"),
    case("listener-not-a-table", "listeners = [5]\n", "listeners[0]", "a table"),
    case("host-as-int", "[leave_alone]\nhosts = [5]\n", "leave_alone.hosts[0]", "not int"),
    case("user-as-bool", "[leave_alone]\nusers = [true]\n", "leave_alone.users[0]", "boolean"),
    case("user-as-float", "[leave_alone]\nusers = [1.5]\n", "leave_alone.users[0]", "not float"),
    case("default-listener-as-int", "default_tcp_listener = 1\n", "default_tcp_listener", "not int"),
    case("mark-as-bool", "[queue]\nmark = true\n", "queue.mark", "boolean"),
    # --- ports and ranges ---------------------------------------------------------
    case("listener-port-0", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 0\n',
         "listeners[0].port", "1-65535"),
    case("listener-port-65536", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 65536\n',
         "listeners[0].port", "1-65535"),
    case("listener-port-negative", '[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = -1\n',
         "listeners[0].port", "1-65535"),
    case("leave-alone-port-0", "[leave_alone]\ntcp_ports = [22, 0]\n", "leave_alone.tcp_ports[1]", "1-65535"),
    case("leave-alone-port-65536", '[leave_alone]\nudp_ports = ["65536"]\n', "leave_alone.udp_ports[0]", "1-65535"),
    case("leave-alone-port-negative", "[leave_alone]\ntcp_ports = [-1]\n", "leave_alone.tcp_ports[0]", "1-65535"),
    case("range-inverted", '[leave_alone]\ntcp_ports = ["9000-8000"]\n', "leave_alone.tcp_ports[0]", "inverted"),
    case("range-open-end", '[leave_alone]\ntcp_ports = ["80-"]\n', "leave_alone.tcp_ports[0]", "a range like"),
    case("range-open-start", '[leave_alone]\nudp_ports = ["-80"]\n', "leave_alone.udp_ports[0]", "a range like"),
    case("range-three-parts", '[leave_alone]\ntcp_ports = ["1-2-3"]\n', "leave_alone.tcp_ports[0]", "a range like"),
    case("range-spaces", '[leave_alone]\ntcp_ports = ["80 - 90"]\n', "leave_alone.tcp_ports[0]", "a range like"),
    case("range-upper-too-high", '[leave_alone]\ntcp_ports = ["80-70000"]\n', "leave_alone.tcp_ports[0]", "1-65535"),
    # int("²") raises ValueError although "²".isdigit(): once a crash, not a ConfigError.
    case("port-superscript-digit", '[leave_alone]\ntcp_ports = ["\u00b2"]\n', "leave_alone.tcp_ports[0]", "a range like"),
    case("port-arabic-digits", '[leave_alone]\ntcp_ports = ["\u0661\u0662"]\n', "leave_alone.tcp_ports[0]", "a range like"),
    case("ports-not-a-list", "[leave_alone]\ntcp_ports = 22\n", "leave_alone.tcp_ports", "a list"),
    # --- addresses ------------------------------------------------------------------
    case("ipv4-octet-300", '[leave_alone]\nhosts = ["300.1.1.1"]\n', "leave_alone.hosts[0]", "does not appear"),
    case("prefix-33", '[leave_alone]\nhosts = ["192.0.2.0/33"]\n', "leave_alone.hosts[0]", "does not appear"),
    case("host-bits-set", '[leave_alone]\nhosts = ["192.0.2.0/24", "192.0.2.1/24"]\n', "leave_alone.hosts[1]",
         "host bits set"),
    case("ipv6-bad-hex", '[leave_alone]\nhosts = ["2001:db8::g"]\n', "leave_alone.hosts[0]", "does not appear"),
    case("ipv6-two-gaps", '[leave_alone]\nhosts = ["2001::db8::1"]\n', "leave_alone.hosts[0]", "does not appear"),
    case("ipv6-prefix-129", '[leave_alone]\nhosts = ["2001:db8::/129"]\n', "leave_alone.hosts[0]", "does not appear"),
    case("ipv6-host-bits", '[leave_alone]\nhosts = ["2001:db8::1/64"]\n', "leave_alone.hosts[0]", "host bits set"),
    # ipaddress takes any text as an IPv6 scope; it went into the ruleset verbatim.
    case("ipv6-scope-injection", '[leave_alone]\nhosts = ["fe80::%x};drop/64"]\n', "leave_alone.hosts[0]", "scope"),
    case("ipv6-scope", '[leave_alone]\nhosts = ["fe80::1%eth0"]\n', "leave_alone.hosts[0]", "scope"),
    case("host-empty", '[leave_alone]\nhosts = [""]\n', "leave_alone.hosts[0]", "does not appear"),
    # --- interface names ----------------------------------------------------------------
    case("iface-too-long", 'interfaces = ["abcdefghijklmnop"]\n', "interfaces[0]", "1-15"),
    case("iface-too-many-bytes", 'interfaces = ["eth0", "\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9"]\n',
         "interfaces[1]", "1-15"),
    case("iface-empty", 'interfaces = [""]\n', "interfaces[0]", "1-15"),
    case("iface-space", 'interfaces = ["eth 0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-quote", 'interfaces = ["eth\\"0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-single-quote", "interfaces = [\"eth'0\"]\n", "interfaces[0]", "kernel refuses"),
    case("iface-slash", 'interfaces = ["eth/0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-colon", 'interfaces = ["eth0:1"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-open-brace", 'interfaces = ["eth{"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-close-brace", 'interfaces = ["eth}"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-semicolon", 'interfaces = ["eth;0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-hash", 'interfaces = ["eth#0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-newline", 'interfaces = ["eth\\n0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-backslash", 'interfaces = ["eth\\\\0"]\n', "interfaces[0]", "kernel refuses"),
    case("iface-dotdot", 'interfaces = [".."]\n', "interfaces[0]", "kernel refuses"),
    case("iface-inner-star", 'interfaces = ["e*th"]\n', "interfaces[0]", "kernel refuses"),
    # nft: "All-wildcard strings are not supported".
    case("iface-bare-star", 'interfaces = ["*"]\n', "interfaces[0]", "wildcard"),
    # --- listeners --------------------------------------------------------------------------
    case("listener-duplicate-port", TCP_LISTENER + '[[listeners]]\nname = "u"\nprotocol = "tcp"\nport = 80\n',
         "listeners[1].port", "another tcp listener"),
    case("listener-udp-smtp", '[[listeners]]\nname = "m"\nprotocol = "udp"\nport = 25\nkind = "smtp"\n',
         "listeners[0].kind", "spoken over tcp"),
    case("listener-unknown-kind", '[[listeners]]\nname = "m"\nprotocol = "tcp"\nport = 25\nkind = "smtps"\n',
         "listeners[0].kind", "one of"),
    case("listener-duplicate-name", TCP_LISTENER + '[[listeners]]\nname = "t"\nprotocol = "udp"\nport = 81\n',
         "listeners[1].name", "another listener"),
    case("listener-bad-name", '[[listeners]]\nname = "a b"\nprotocol = "tcp"\nport = 80\n',
         "listeners[0].name", "names are"),
    case("listener-bad-protocol", '[[listeners]]\nname = "t"\nprotocol = "sctp"\nport = 80\n',
         "listeners[0].protocol", "one of tcp, udp"),
    case("listener-bad-kind", TCP_LISTENER + 'kind = "proxy"\n', "listeners[0].kind", "must be one of echo"),
    case("default-listener-missing", 'default_tcp_listener = "nope"\n', "default_tcp_listener", "no listener"),
    case("default-listener-wrong-protocol", 'default_tcp_listener = "udp-echo"\n', "default_tcp_listener",
         "is udp, not tcp"),
    case("default-udp-listener-wrong-protocol", 'default_udp_listener = "tcp-echo"\n', "default_udp_listener",
         "is tcp, not udp"),
    case("default-listener-port-left-alone", '[leave_alone]\ntcp_ports = ["1000-2000"]\n', "default_tcp_listener",
         "leave_alone.tcp_ports"),
    case("default-listener-port-left-alone-exact", '[leave_alone]\nudp_ports = [1337]\n', "default_udp_listener",
         "leave_alone.udp_ports"),
    # --- queue --------------------------------------------------------------------------------
    case("queue-incoming-65536", "[queue]\nincoming = 65536\n", "queue.incoming", "0-65535"),
    case("queue-outgoing-negative", "[queue]\noutgoing = -1\n", "queue.outgoing", "0-65535"),
    case("queue-numbers-equal", "[queue]\nincoming = 7\noutgoing = 7\n", "queue.outgoing", "must differ"),
    case("queue-workers-negative", "[queue]\nworkers = -1\n", "queue.workers", "0 (one per CPU) to 64"),
    case("queue-workers-too-many", "[queue]\nworkers = 65\n", "queue.workers", "0 (one per CPU) to 64"),
    case("queue-workers-as-string", '[queue]\nworkers = "2"\n', "queue.workers", "not str"),
    case("queue-worker-ranges-overlap", "[queue]\nworkers = 4\nincoming = 10\noutgoing = 12\n", "queue.outgoing",
         "queues 10-13 (incoming) and 12-15 (outgoing): the two ranges must not overlap"),
    case("queue-worker-range-beyond", "[queue]\nworkers = 2\nincoming = 65535\noutgoing = 0\n", "queue.incoming",
         "beyond 65535"),
    case("queue-worker-mark-split", "[queue]\nworkers = 2\nworker_mark = 0x0500\n", "queue.worker_mark",
         "one run of set bits"),
    case("queue-worker-mark-shares", "[queue]\nworkers = 2\nworker_mark = 0x00010000\n", "queue.worker_mark",
         "shares bits with queue.mark"),
    case("queue-worker-mark-too-narrow", "[queue]\nworkers = 3\nworker_mark = 0x01000000\n", "queue.worker_mark",
         "holds 2 worker numbers, not 3"),
    case("queue-workers-pcap-rewritten", '[queue]\nworkers = 2\n[worker]\npcap_rewritten = "w.pcap"\n',
         "worker.pcap_rewritten", "one worker's view"),
    case("queue-number-as-string", '[queue]\nincoming = "0"\n', "queue.incoming", "not str"),
    case("queue-mark-zero", "[queue]\nmark = 0\n", "queue.mark", "non-zero"),
    case("queue-mark-too-wide", "[queue]\nmark = 0x100000000\n", "queue.mark", "32-bit"),
    case("bad-backend", '[queue]\nbackend = "iptables"\n', "queue.backend", "one of auto, nft, xt"),
    case("bad-fail", '[queue]\nfail = "maybe"\n', "queue.fail", "one of closed, open"),
    case("admission-negative", "[queue]\nnew_tcp_per_source = -1\n", "queue.new_tcp_per_source", "0 (no limit) to"),
    case("admission-too-high", "[queue]\nnew_udp_per_source = 1000001\n", "queue.new_udp_per_source", "to 1000000"),
    case("admission-as-bool", "[queue]\nnew_tcp_per_source = true\n", "queue.new_tcp_per_source", "boolean"),
    case("admission-as-float", "[queue]\nnew_udp_per_source = 1.5\n", "queue.new_udp_per_source", "not float"),
    case("admission-as-string", '[queue]\nnew_tcp_per_source = "1000/second"\n', "queue.new_tcp_per_source",
         "not str"),
    case("admission-group-too-high", "[queue]\nadmission_group = 65536\n", "queue.admission_group", "0-65535"),
    case("admission-group-is-the-captures", "[queue]\nadmission_group = 7\n[worker]\npcap_group = 7\n",
         "queue.admission_group", "must differ from worker.pcap_group"),
    # --- mode, table --------------------------------------------------------------------------
    case("bad-mode", 'mode = "router"\n', "mode", "one of gateway, local, both"),
    case("mode-uppercase", 'mode = "Gateway"\n', "mode", "one of gateway"),
    case("table-quote", 'table = "nft\\"divert"\n', "table", "table names are"),
    case("table-semicolon", 'table = "a;flush ruleset"\n', "table", "table names are"),
    case("table-brace", 'table = "a{"\n', "table", "table names are"),
    case("table-hash", 'table = "a#b"\n', "table", "table names are"),
    case("table-newline", 'table = "a\\nb"\n', "table", "table names are"),
    case("table-space", 'table = "a b"\n', "table", "table names are"),
    case("table-too-long", f'table = "{"t" * 33}"\n', "table", "1-32"),
    case("table-empty", 'table = ""\n', "table", "table names are"),
    case("table-leading-digit", 'table = "1table"\n', "table", "starting with a letter"),
    # --- users, groups, cgroups ------------------------------------------------------------------
    case("user-uppercase", '[leave_alone]\nusers = ["Root"]\n', "leave_alone.users[0]", "not a valid user"),
    case("user-space", '[leave_alone]\nusers = ["a b"]\n', "leave_alone.users[0]", "not a valid user"),
    case("user-quote", '[leave_alone]\nusers = ["root", "a\\"b"]\n', "leave_alone.users[1]", "not a valid user"),
    case("user-empty", '[leave_alone]\nusers = [""]\n', "leave_alone.users[0]", "not a valid user"),
    case("user-id-negative", "[leave_alone]\nusers = [-1]\n", "leave_alone.users[0]", "ids are"),
    case("user-id-too-big", "[leave_alone]\nusers = [4294967295]\n", "leave_alone.users[0]", "ids are"),
    case("group-brace", '[leave_alone]\ngroups = ["adm}"]\n', "leave_alone.groups[0]", "not a valid user or group"),
    case("cgroup-dotdot", '[leave_alone]\ncgroups = ["../x"]\n', "leave_alone.cgroups[0]", "cgroup v2 path"),
    case("cgroup-space", '[leave_alone]\ncgroups = ["a b"]\n', "leave_alone.cgroups[0]", "cgroup v2 path"),
    case("cgroup-quote", '[leave_alone]\ncgroups = ["a\\"b"]\n', "leave_alone.cgroups[0]", "cgroup v2 path"),
    case("cgroup-root", '[leave_alone]\ncgroups = ["/"]\n', "leave_alone.cgroups[0]", "cgroup v2 path"),
    case("cgroup-inner-dotdot", '[leave_alone]\ncgroups = ["system.slice/../x"]\n', "leave_alone.cgroups[0]",
         "cgroup v2 path"),
    case("cgroup-as-int", "[leave_alone]\ncgroups = [1]\n", "leave_alone.cgroups[0]", "not int"),
    # --- families, worker ----------------------------------------------------------------------
    case("no-family", "ipv4 = false\nipv6 = false\n", "ipv6", "both off"),
    case("max-conversations-too-small", "[worker]\nmax_conversations = 15\n", "worker.max_conversations", "16-"),
    case("max-conversations-too-big", "[worker]\nmax_conversations = 10000001\n", "worker.max_conversations", "16-"),
    case("negative-seconds", "[worker]\ntcp_idle = -1\n", "worker.tcp_idle", "more than 0"),
    case("zero-seconds", "[worker]\nudp_idle = 0\n", "worker.udp_idle", "more than 0"),
    case("seconds-beyond-a-week", "[worker]\nclose_grace = 604801\n", "worker.close_grace", "at most a week"),
    case("seconds-as-string", '[worker]\nclose_grace = "10s"\n', "worker.close_grace", "not str"),
    case("log-format", '[worker]\nlog_format = "xml"\n', "worker.log_format", "one of auto, json, text"),
    case("pcap-group-range", '[worker]\npcap_group = 65536\n', "worker.pcap_group", "nflog groups are 0-65535"),
    case("pcap-group-type", '[worker]\npcap_group = "1"\n', "worker.pcap_group", "an integer nflog group"),
    case("queued-ct-mark-overlap", '[queue]\nct_mark = 0x300000\n', "queue.ct_mark", "shares bits with worker.ct_mark"),
    case("queued-ct-mark-zero", '[queue]\nct_mark = 0\n', "queue.ct_mark", "non-zero 32-bit mask"),
    case("divert-path", 'divert_path = "fast"\n', "divert_path", "must be one of queue, kernel"),
    case("kernel-path-rewritten", 'divert_path = "kernel"\n[worker]\npcap_rewritten = "/tmp/x.pcap"\n',
         "worker.pcap_rewritten", "the kernel path has no queue worker"),
    case("pcap-twice", '[worker]\npcap = "a.pcap"\npcap_rewritten = "a.pcap"\n', "worker.pcap_rewritten",
         "must differ from worker.pcap"),
    case("log-newline", '[worker]\nlog = "a\\nb"\n', "worker.log", "newline"),
    case("after-stop-choice", 'containment_after_stop = "maybe"\n', "containment_after_stop", "one of keep, remove"),
    case("clock-offset-text", '[small_services]\nclock_offset = "1h"\n', "small_services.clock_offset",
         "a number of seconds"),
    case("clock-offset-nan", '[small_services]\nclock_offset = nan\n', "small_services.clock_offset", "50 years"),
    case("clock-offset-too-far", '[small_services]\nclock_offset = 1e12\n', "small_services.clock_offset",
         "50 years"),
    case("irc-server-space", '[small_services]\nirc_server = "irc example"\n', "small_services.irc_server",
         "letters, digits"),
    case("log-schema", '[worker]\nlog_schema = "otel"\n', "worker.log_schema", "one of nftdivert, ecs"),
    case("syslog-no-port", '[syslog]\naddress = "collector.example"\n', "syslog.address", "a host and a port"),
    case("syslog-bare-v6", '[syslog]\naddress = "2001:db8::9:514"\n', "syslog.address", "[bracketed] IPv6"),
    case("syslog-ca-without-tls", '[syslog]\naddress = "192.0.2.9:514"\nca_file = "/ca.pem"\n', "syslog.ca_file",
         "only with tls = true"),
    case("syslog-key-alone", '[syslog]\ntls = true\nkey_file = "/k.pem"\n', "syslog.key_file", "set cert_file"),
    case("syslog-buffer", '[syslog]\nbuffer = 0\n', "syslog.buffer", "1-10000000"),
    case("syslog-app-name", '[syslog]\napp_name = "gw a"\n', "syslog.app_name", "printable ASCII"),
    case("syslog-facility", '[syslog]\nfacility = "local9"\n', "syslog.facility", "one of kern"),
    # --- not TOML at all ---------------------------------------------------------------------------
    case("toml-syntax-error", 'mode = "gateway\n', "--config", "not valid TOML"),
    case("toml-duplicate-key", 'mode = "gateway"\nmode = "local"\n', "--config", "not valid TOML"),
]


def test_bad_table_is_big_enough():
    assert len(BAD) >= 35
    assert len({p.id for p in BAD}) == len(BAD)


@pytest.mark.parametrize("toml, key, reason", BAD)
def test_bad_config_names_the_key(tmp_path, toml, key, reason):
    path = tmp_path / "bad.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert err.key == key, f"{err}"
    assert reason in err.reason, f"{err}"
    # The message a person sees names the key too.
    assert str(err).startswith(f"{key} = ")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    assert info.value.key == "--config"


def test_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('table = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.key, info.value.reason) == ("--config", "not UTF-8 text (byte 12)")


# ---- defaults -----------------------------------------------------------------

@pytest.mark.parametrize("cls", [Config, *config_mod._SECTIONS.values()], ids=lambda c: c.__name__)
def test_every_key_has_a_default(cls):
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert missing == []


def test_listener_has_defaults_only_where_documented():
    # A listener is an element of a list, not a config key: name, protocol and
    # port are required, kind defaults to the built-in echo service.
    required = [f.name for f in dataclasses.fields(Listener) if f.default is dataclasses.MISSING]
    assert required == ["name", "protocol", "port"]
    assert Listener("x", "tcp", 1).kind == "echo"


def test_no_file_and_empty_file_are_the_safe_default(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for cfg in (Config(), load(None), load(empty), from_mapping({})):
        assert cfg == Config()
    cfg = Config()
    assert cfg.mode == "gateway" and cfg.table == "nftdivert"
    assert cfg.ipv4 and cfg.ipv6 and cfg.forward_containment
    assert cfg.queue.fail == "closed" and cfg.queue.backend == "auto"
    assert (cfg.queue.incoming, cfg.queue.outgoing, cfg.queue.workers) == (0, 64, 0)
    assert (cfg.queue.new_tcp_per_source, cfg.queue.new_udp_per_source) == (500, 2000)
    assert cfg.default_listener("tcp") == Listener("tcp-echo", "tcp", 1337)
    assert cfg.default_listener("udp") == Listener("udp-echo", "udp", 1337)


def test_a_commands_own_defaults_apply_where_the_file_says_nothing(tmp_path):
    defaults = {"queue": {"new_tcp_per_source": 0, "new_udp_per_source": 0}}
    assert (load(None, defaults).queue.new_tcp_per_source, load(None, defaults).queue.new_udp_per_source) == (0, 0)
    some = tmp_path / "some.toml"
    some.write_text('[queue]\nnew_tcp_per_source = 100\nfail = "open"\n')
    cfg = load(some, defaults)
    assert (cfg.queue.new_tcp_per_source, cfg.queue.new_udp_per_source, cfg.queue.fail) == (100, 0, "open")
    assert load(some).queue.new_udp_per_source == 2000  # `run`: its own default
    bad = tmp_path / "bad.toml"
    bad.write_text("queue = 3\n")
    with pytest.raises(ConfigError, match="queue"):
        load(bad, defaults)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().mode = "local"  # type: ignore[misc]


def test_config_constructor_validates_too():
    with pytest.raises(ConfigError) as info:
        Config(table="a;b")
    assert info.value.key == "table"
    with pytest.raises(ConfigError) as info:
        Config(queue=QueueConfig(incoming=3, outgoing=3))
    assert info.value.key == "queue.outgoing"


# ---- good configs ---------------------------------------------------------------

GOOD = """
mode = "both"
table = "divert_lab"
interfaces = ["eth1", "wg*", "br-lan"]
forward_containment = false
default_udp_listener = ""

[[listeners]]
name = "web"
protocol = "tcp"
port = 8080
kind = "external"

[[listeners]]
name = "dns"
protocol = "udp"
port = 5353

[[listeners]]
name = "tcp-alt"
protocol = "tcp"
port = 5353

[leave_alone]
tcp_ports = [22, "8000-8079", "9000-9000", 65535]
udp_ports = ["1-52", 54]
hosts = ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32", "::1"]
users = ["root", 0, "systemd-network", 65534, "machine$"]
groups = ["adm", 4]
cgroups = ["system.slice/sshd.service", "/user.slice/", "init.scope"]

[queue]
backend = "xt"
incoming = 65535
outgoing = 0
fail = "open"
mark = 0x10

[worker]
max_conversations = 16
tcp_idle = 0.5
udp_idle = 604800
close_grace = 3
log = ""
log_format = "json"
pcap = "/var/log/nftdivert/capture.pcap"
pcap_group = 0
pcap_rewritten = "/var/log/nftdivert/rewritten.pcap"
"""


def test_good_config_loads(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    cfg = load(path)
    assert cfg.mode == "both" and cfg.table == "divert_lab"
    assert cfg.interfaces == ("eth1", "wg*", "br-lan")
    assert cfg.forward_containment is False
    assert cfg.listeners == (Listener("web", "tcp", 8080, "external"), Listener("dns", "udp", 5353),
                             Listener("tcp-alt", "tcp", 5353))
    # Not given: the first TCP listener; "" means no default listener at all.
    assert cfg.default_tcp_listener == "web"
    assert cfg.default_udp_listener is None
    assert cfg.default_listener("udp") is None
    la = cfg.leave_alone
    assert la.tcp_ports == (PortRange(22, 22), PortRange(8000, 8079), PortRange(9000, 9000), PortRange(65535, 65535))
    assert la.udp_ports == (PortRange(1, 52), PortRange(54, 54))
    assert [str(r) for r in la.tcp_ports] == ["22", "8000-8079", "9000", "65535"]
    assert la.hosts == tuple(ipaddress.ip_network(h) for h in
                             ("192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32", "::1/128"))
    assert la.users == ("root", 0, "systemd-network", 65534, "machine$")
    assert la.groups == ("adm", 4)
    assert la.cgroups == ("system.slice/sshd.service", "/user.slice/", "init.scope")
    assert cfg.queue == QueueConfig(backend="xt", incoming=65535, outgoing=0, fail="open", mark=0x10)
    assert cfg.worker == WorkerConfig(max_conversations=16, tcp_idle=0.5, udp_idle=604800, close_grace=3,
                                      log="", log_format="json", pcap="/var/log/nftdivert/capture.pcap",
                                      pcap_group=0, pcap_rewritten="/var/log/nftdivert/rewritten.pcap")


def test_default_tcp_listener_empty_means_none():
    cfg = from_mapping({"default_tcp_listener": "", "default_udp_listener": "udp-echo"})
    assert cfg.default_tcp_listener is None and cfg.default_listener("tcp") is None
    assert cfg.default_listener("udp").port == 1337


def test_own_listeners_without_one_protocol_have_no_default_for_it():
    cfg = from_mapping({"listeners": [{"name": "only-tcp", "protocol": "tcp", "port": 2000}]})
    assert cfg.default_tcp_listener == "only-tcp"
    assert cfg.default_udp_listener is None


def test_tcp_and_udp_listener_may_share_a_port():
    cfg = from_mapping({"listeners": [{"name": "a", "protocol": "tcp", "port": 7},
                                      {"name": "b", "protocol": "udp", "port": 7}]})
    assert [lst.port for lst in cfg.listeners] == [7, 7]


def test_default_listener_port_just_outside_leave_alone_range_is_fine():
    cfg = from_mapping({"leave_alone": {"tcp_ports": ["1-1336", "1338-65535"]}})
    assert cfg.default_listener("tcp").port == 1337


@pytest.mark.parametrize("value, first, last", [
    (1, 1, 1), (65535, 65535, 65535), ("443", 443, 443), ("1-65535", 1, 65535), ("8000-8000", 8000, 8000),
])
def test_port_range_parse(value, first, last):
    assert PortRange.parse("k", value) == PortRange(first, last)


@pytest.mark.parametrize("name", ["eth0", "a" * 15, "wg*", "br-lan", "enp0s31f6", "veth.10", "a<b", "x&y"])
def test_interface_names_the_kernel_accepts(name):
    assert Config(interfaces=(name,)).interfaces == (name,)


def test_only_one_family():
    assert Config(ipv4=False).ipv6 and Config(ipv6=False).ipv4


# ---- the CLI's face of a bad config -----------------------------------------------

def test_cli_render_bad_config_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[listeners]]\nname = "t"\nprotocol = "tcp"\nport = 70000\n')
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "nftdivert", "render", "-c", str(path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "listeners[0].port" in proc.stderr
    assert "70000" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_render_unparsable_config_exits_2(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("mode = \n")
    proc = subprocess.run([sys.executable, "-m", "nftdivert", "render", "-c", str(path)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--config" in proc.stderr and str(path) in proc.stderr and "not valid TOML" in proc.stderr


def test_module_constants_match_validation():
    # The documented choices are the ones enforced.
    for mode in config_mod.MODES:
        assert Config(mode=mode).mode == mode
    for backend in config_mod.BACKENDS:
        assert Config(queue=QueueConfig(backend=backend)).queue.backend == backend
    for after_stop in config_mod.AFTER_STOP:
        assert Config(containment_after_stop=after_stop).containment_after_stop == after_stop


# ---- [[custom]]: answers the analyst writes ------------------------------------

CUSTOM_BAD = [
    pytest.param('[[custom]]\nports = [4444]\nstatic = "x"\n', "custom[0].protocol", "missing", id="no-protocol"),
    pytest.param('[[custom]]\nprotocol = "sctp"\nstatic = "x"\n', "custom[0].protocol", "one of", id="protocol"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nports = [70000]\nstatic = "x"\n', "custom[0].ports[0]", "1-65535",
                 id="port"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nhosts = ["198.51.100.1/24"]\nstatic = "x"\n', "custom[0].hosts[0]",
                 "host bits", id="hosts"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nnames = ["a*.example"]\nstatic = "x"\n', "custom[0].names[0]",
                 "wildcard", id="names"),
    pytest.param('[[custom]]\nprotocol = "tcp"\n', "custom[0].static", "exactly one", id="no-answer"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nstatic = "x"\nhex = "00"\n', "custom[0].hex", "exactly one",
                 id="two-answers"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nhex = "zz"\n', "custom[0].hex", "not hex", id="hex"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nbase64 = "a*b"\n', "custom[0].base64", "not base64", id="base64"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nfile = "/nonexistent/x"\n', "custom[0].file", "No such file",
                 id="file"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nstatic = "x"\nwhen = "later"\n', "custom[0].when", "one of",
                 id="when"),
    pytest.param('[[custom]]\nprotocol = "tcp"\nstatic = "x"\ncolour = 1\n', "custom[0].colour", "unknown key",
                 id="unknown"),
]


@pytest.mark.parametrize("toml, key, reason", CUSTOM_BAD)
def test_bad_custom_rule_names_the_key(tmp_path, toml, key, reason):
    test_bad_config_names_the_key(tmp_path, toml, key, reason)


@pytest.mark.parametrize("source, reason", [
    ("def tcp(conn:\n", "does not load: SyntaxError"),
    ("def tcp(conn):\n    pass\n", "defines no `async def tcp(conn)`"),
])
def test_a_custom_script_that_does_not_load_is_refused(tmp_path, source, reason):
    script = tmp_path / "beacon.py"
    script.write_text(source)
    test_bad_config_names_the_key(tmp_path, f'[[custom]]\nprotocol = "tcp"\nscript = "{script}"\n',
                                  "custom[0].script", reason)


def test_custom_rules_load(tmp_path):
    (tmp_path / "banner.bin").write_bytes(b"\x00banner")
    (tmp_path / "b.py").write_text("def udp(datagram, info):\n    return datagram\n")
    path = tmp_path / "ok.toml"
    path.write_text(f'[[custom]]\nname = "banner"\nprotocol = "tcp"\nports = [4444, "5000-5001"]\n'
                    f'hosts = ["198.51.100.0/24"]\nnames = ["*.c2.example"]\nfile = "{tmp_path / "banner.bin"}"\n'
                    f'[[custom]]\nprotocol = "udp"\nscript = "{tmp_path / "b.py"}"\n'
                    f'[[custom]]\nprotocol = "tcp"\nhex = "de ad"\nwhen = "every_message"\n')
    rules = load(path).custom
    assert rules[0].name == "banner" and rules[0].payload() == b"\x00banner" and 5001 in rules[0].ports[1]
    assert rules[1].name == "custom1" and rules[1].payload() is None
    assert rules[2].payload() == b"\xde\xad"


def test_every_toml_example_in_answers_you_write_loads(tmp_path):
    """The listeners reference's section, each block as written (the scripts' paths made this test's)."""
    import pathlib
    import re as re_

    page = (pathlib.Path(__file__).resolve().parent.parent / "docs/reference/listeners.md").read_text()
    section = page[page.index("## Answers you write"):page.index("## The DNS listener")]
    for name, source in re_.findall(r"<!-- answers: (\w+)\.py -->\n```python\n(.*?)```", section, re_.S):
        (tmp_path / f"{name}.py").write_text(source)
    blocks = re_.findall(r"```toml\n(.*?)```", section, re_.S)
    assert len(blocks) >= 5
    for block in blocks:
        path = tmp_path / "example.toml"
        path.write_text(block.replace("/etc/nftdivert/", f"{tmp_path}/"))
        load(path)


def test_queue_workers_one_per_cpu_unless_said():
    import os
    cpus = len(os.sched_getaffinity(0))
    assert Config().queue_workers() == min(cpus, 64)
    assert Config(queue=QueueConfig(workers=3, outgoing=10)).queue_workers() == 3
    assert from_mapping({"worker": {"pcap_rewritten": "w.pcap"}}).queue_workers() == 1  # one worker's view
    assert from_mapping({"divert_path": "kernel"}).queue_workers() == 0  # nothing is queued
