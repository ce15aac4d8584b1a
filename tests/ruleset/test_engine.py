"""The engine against a real kernel: apply, check, diff, remove, status.

Every test works in its own fresh network namespace (the `host` fixture),
which is removed afterwards; the CLI runs inside it as a subprocess, exactly
as a person would run it. The root namespace's ruleset is never touched.

This kernel may lack CONFIG_NFT_QUEUE: tests of the native nft backend that
need to load a `queue` statement skip there (the VM tier runs them), and the
rest use the xt backend, which `auto` picks on such a kernel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import unprivileged
from conftest import nftdivert_argv
from nftdivert.ruleset import engine, render
from nftdivert.config import load

pytestmark = pytest.mark.kernel

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
TAG = "nftdivert:nftdivert"

QUEUE_PROBE = """\
table inet nftdivert_probe {
	chain probe {
		type filter hook output priority raw; policy accept;
		queue num 0 bypass
	}
}
"""

FOREIGN = """\
table ip foreign {
	set blocked {
		type ipv4_addr
		flags interval
		elements = { 192.0.2.0/24, 198.51.100.9 }
	}

	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @blocked counter drop
		tcp dport 22 accept
	}
}
table inet docker_like {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		tcp dport 8080 dnat ip to 172.17.0.2:80
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
	}
}
"""


# ---- helpers -------------------------------------------------------------------

class Cli:
    """nftdivert and nft inside one namespace."""

    def __init__(self, host, env, tmp_path: Path):
        self.host, self.env, self.tmp = host, env, tmp_path

    def __call__(self, *args: str, user: int | None = None) -> subprocess.CompletedProcess:
        if user is not None:
            return self.host.run(*unprivileged.python("-m", "nftdivert", *args, uid=user), check=False,
                                 env=unprivileged.env(self.env), timeout=120)
        return self.host.run(*nftdivert_argv(*args), check=False, env=self.env, timeout=120)

    def ok(self, *args: str) -> subprocess.CompletedProcess:
        proc = self(*args)
        assert proc.returncode == 0, f"nftdivert {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def config(self, text: str, name: str = "config.toml") -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)

    def nft(self, *args: str, check: bool = True, input: str | None = None) -> str:
        return self.host.run("nft", *args, check=check, input=input).stdout

    def nft_json(self, *args: str) -> list[dict]:
        return json.loads(self.nft("-j", *args))["nftables"]

    def chains(self, table: str = "inet nftdivert") -> dict[str, dict]:
        return {o["chain"]["name"]: o["chain"] for o in self.nft_json("list", "table", *table.split())
                if "chain" in o}

    def xt_save(self, family: str) -> str:
        tool = {"ipv4": "iptables-nft-save", "ipv6": "ip6tables-nft-save"}[family]
        return self.host.run(tool).stdout

    def xt_tagged(self, family: str, tag: str = TAG) -> list[str]:
        return [line for line in self.xt_save(family).splitlines()
                if line.startswith("-A ") and f'--comment "{tag}"' in line]

    def native_queue(self) -> bool:
        proc = self.host.run("nft", "-c", "-f", "-", input=QUEUE_PROBE, check=False)
        return proc.returncode == 0


@pytest.fixture
def cli(host, cli_env, tmp_path):
    return Cli(host, cli_env, tmp_path)


@pytest.fixture
def public_dir():
    """A directory an unprivileged user can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="nftdivert-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


XT = '[queue]\nbackend = "xt"\n'
LOCAL_XT = 'mode = "local"\n' + XT
BAD_CGROUP = 'mode = "local"\n[leave_alone]\ncgroups = ["does-not-exist.slice"]\n' + XT


def need_backend(cli: Cli, backend: str) -> None:
    if backend == "nft" and not cli.native_queue():
        pytest.skip("this kernel has no nft queue statement (CONFIG_NFT_QUEUE); the VM tier runs this")


# ---- apply: hooks and priorities -------------------------------------------------

@pytest.mark.parametrize("backend", ["xt", pytest.param("nft", marks=pytest.mark.vm)])
def test_apply_gateway_hooks_and_priorities(cli, backend):
    need_backend(cli, backend)
    out = cli.ok("apply", "-c", cli.config(f'[queue]\nbackend = "{backend}"\n')).stdout
    assert f"queue backend: {backend}" in out
    ch = cli.chains()
    offset = 0 if backend == "nft" else -1  # xt: mark just before iptables-nft queues
    want = {
        "answer_for_all": ("nat", "prerouting", -100, "accept"),
        "drop_spoofed": ("filter", "prerouting", -299, "accept"),  # just after the capture (raw)
        "divert_incoming": ("filter", "input", -150 + offset, "accept"),
        "restore_replies": ("filter", "output", -300 + offset, "accept"),
        "contain": ("filter", "forward", 0, "drop"),
    }
    for name, (type_, hook, prio, policy) in want.items():
        c = ch[name]
        assert (c["type"], c["hook"], c["prio"], c["policy"]) == (type_, hook, prio, policy), name
    assert "hook" not in ch["divert_unbound"]  # a regular chain, reached by jump
    assert "answer_for_self" not in ch
    if backend == "xt":
        assert (ch["unmark_incoming"]["hook"], ch["unmark_incoming"]["prio"]) == ("input", -149)
        assert (ch["unmark_replies"]["hook"], ch["unmark_replies"]["prio"]) == ("output", -299)
        # The iptables-nft rules that queue sit between mark and unmark, in both families.
        for family in ("ip", "ip6"):
            for ipt_table, chain, hook, prio, queue in (("raw", "OUTPUT", "output", -300, 1),
                                                        ("mangle", "INPUT", "input", -150, 0)):
                objects = cli.nft_json("list", "table", family, ipt_table)
                c = next(o["chain"] for o in objects if "chain" in o and o["chain"]["name"] == chain)
                assert (c["hook"], c["prio"]) == (hook, prio)
                rules = [o["rule"] for o in objects if "rule" in o and o["rule"]["chain"] == chain]
                assert len(rules) == 1
                assert {"xt": {"type": "target", "name": "NFQUEUE"}} in rules[0]["expr"]
            save = cli.xt_save("ipv4" if family == "ip" else "ipv6")
            assert f'-A OUTPUT -m mark --mark 0xd10000/0xd10000 -m comment --comment "{TAG}" -j NFQUEUE --queue-num 64' in save
            assert f'-A INPUT -m mark --mark 0xd10000/0xd10000 -m comment --comment "{TAG}" -j NFQUEUE --queue-num 0' in save
    else:
        assert "unmark_incoming" not in ch
        assert cli.xt_tagged("ipv4") == [] and cli.xt_tagged("ipv6") == []


def test_apply_local_mode_hooks(cli):
    cli.ok("apply", "-c", cli.config(LOCAL_XT))
    ch = cli.chains()
    c = ch["answer_for_self"]
    assert (c["type"], c["hook"], c["prio"], c["policy"]) == ("nat", "output", -100, "accept")
    assert "answer_for_all" not in ch and "contain" not in ch and "drop_spoofed" not in ch
    assert (ch["divert_incoming"]["hook"], ch["divert_incoming"]["prio"]) == ("input", -151)
    assert (ch["restore_replies"]["hook"], ch["restore_replies"]["prio"]) == ("output", -301)


def test_apply_both_modes_and_interfaces(cli, tmp_path):
    cli.host.run("ip", "link", "add", "a<b", "type", "veth", "peer", "name", "a-peer")
    cli.ok("apply", "-c", cli.config('mode = "both"\ninterfaces = ["eth1", "a<b"]\n' + XT))
    ch = cli.chains()
    assert {"answer_for_all", "answer_for_self", "contain"} <= set(ch)
    # With interfaces, containment drops only what arrives on them.
    assert ch["contain"]["policy"] == "accept"
    rules = [o["rule"] for o in cli.nft_json("list", "chain", "inet", "nftdivert", "contain") if "rule" in o]
    rules = rules[1:]  # after neighbour discovery, which a bridge's clients need
    match = rules[0]["expr"][0]["match"]
    assert match["left"] == {"meta": {"key": "iifname"}}
    # The names reach the kernel verbatim (not JSON-escaped "a\\u003cb").
    assert sorted(match["right"]["set"]) == ["a<b", "eth1"]
    assert "drop" in rules[0]["expr"][-1]


def test_apply_fills_bound_port_sets_from_this_namespace(cli):
    listener = cli.host.popen("python3", "-c", (
        "import socket, sys, time\n"
        "t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "t.bind(('127.0.0.1', 5555)); t.listen()\n"
        "u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(('::1', 5556))\n"
        "print('ready', flush=True); time.sleep(120)\n"), text=True)
    assert listener.stdout.readline().strip() == "ready"
    cli.ok("apply", "-c", cli.config(XT))

    def elements(name: str) -> list:
        objects = cli.nft_json("list", "set", "inet", "nftdivert", name)
        return next(o["set"] for o in objects if "set" in o).get("elem", [])

    # Each for its own family and address only.
    assert elements("bound_tcp_v4") == [{"concat": ["127.0.0.1", 5555]}]
    assert elements("bound_udp_v6") == [{"concat": ["::1", 5556]}]
    assert elements("bound_tcp_v6") == elements("bound_udp_v4") == []


# ---- atomicity ---------------------------------------------------------------------

def test_rejected_apply_keeps_the_previous_table(cli):
    cli.ok("apply", "-c", cli.config(XT, "a.toml"))
    before = cli.nft("list", "table", "inet", "nftdivert")
    xt_before = (cli.xt_tagged("ipv4"), cli.xt_tagged("ipv6"))

    bad = cli.config(BAD_CGROUP, "b.toml")
    proc = cli("apply", "-c", bad)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    # libnftables names the line: "ruleset:LINE:COLUMNS: Error: ..." and shows it.
    m = re.search(r"ruleset:(\d+):\d+(?:-\d+)?: Error: cgroupv2 path fails", proc.stderr)
    assert m, proc.stderr
    line = render.render_for(load(bad)).splitlines()[int(m.group(1)) - 1]
    assert line.strip() == 'socket cgroupv2 level 1 "does-not-exist.slice" return'
    assert 'socket cgroupv2 level 1 "does-not-exist.slice" return' in proc.stderr

    assert cli.nft("list", "table", "inet", "nftdivert") == before
    assert (cli.xt_tagged("ipv4"), cli.xt_tagged("ipv6")) == xt_before
    assert "answer_for_self" not in cli.chains()
    assert cli("diff", "-c", cli.config(XT, "a.toml")).returncode == 0


def test_rejected_first_apply_leaves_nothing(cli):
    proc = cli("apply", "-c", cli.config(BAD_CGROUP))
    assert proc.returncode == 1
    assert cli.nft("list", "ruleset") == ""
    assert "NFQUEUE" not in cli.xt_save("ipv4") + cli.xt_save("ipv6")


def _apply_with_tools(cli: Cli, config: str, tools: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`nftdivert apply` with only `tools` of iptables on its PATH (none: the package is missing)."""
    bin_dir = cli.tmp / f"bin-{len(tools)}"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    return cli.host.run("env", f"PATH={bin_dir}", *nftdivert_argv("apply", "-c", config), env=cli.env,
                        check=False, timeout=120)


def _failed_after_commit(proc: subprocess.CompletedProcess, taken_back: str) -> None:
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert taken_back in proc.stderr and "is missing: the xt queue backend needs" in proc.stderr, proc.stderr


# The kernel commits the table first; the xt backend's rules come after it. A
# failure there used to leave the table loaded, marking packets no rule queues.
def test_apply_that_fails_after_the_commit_takes_its_table_back(cli):
    proc = _apply_with_tools(cli, cli.config(XT), ())
    _failed_after_commit(proc, "so it was taken back (removed)")
    assert cli.nft("list", "ruleset") == ""


def test_apply_that_fails_half_way_through_the_xt_rules_takes_them_back_too(cli):
    # IPv4's rules go in, IPv6's cannot: the IPv4 ones must go again.
    proc = _apply_with_tools(cli, cli.config(XT), ("iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-save"))
    _failed_after_commit(proc, "so it was taken back (removed)")
    assert cli.nft("list", "ruleset") == ""
    assert "NFQUEUE" not in cli.xt_save("ipv4") + cli.xt_save("ipv6")


def test_apply_that_fails_after_the_commit_restores_the_previous_table(cli):
    cli.ok("apply", "-c", cli.config(XT, "a.toml"))
    before = cli.nft("-s", "list", "table", "inet", "nftdivert")
    xt_before = (cli.xt_tagged("ipv4"), cli.xt_tagged("ipv6"))
    # Other queues, so the rules must change; IPv6's cannot.
    other = cli.config(XT + "incoming = 7\noutgoing = 8\n[leave_alone]\ntcp_ports = [22]\n", "b.toml")
    proc = _apply_with_tools(cli, other, ("iptables-nft-restore", "iptables-nft-save", "ip6tables-nft-save"))
    _failed_after_commit(proc, "so it was taken back (the previous table is restored)")
    assert cli.nft("-s", "list", "table", "inet", "nftdivert") == before
    assert (cli.xt_tagged("ipv4"), cli.xt_tagged("ipv6")) == xt_before
    assert cli("diff", "-c", cli.config(XT, "a.toml")).returncode == 0


def test_bad_config_applies_nothing_and_exits_2(cli):
    proc = cli("apply", "-c", cli.config('mode = "router"\n'))
    assert proc.returncode == 2
    assert "mode" in proc.stderr and "router" in proc.stderr
    assert cli.nft("list", "ruleset") == ""


# ---- coexistence -----------------------------------------------------------------------

def test_foreign_tables_and_rules_survive_apply_and_remove(cli):
    cli.nft("-f", "-", input=FOREIGN)
    # Someone else's iptables-nft rules in the very chains the xt backend uses.
    cli.host.run("iptables-nft", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "53",
                 "-m", "comment", "--comment", "someone else", "-j", "CT", "--notrack")
    cli.host.run("ip6tables-nft", "-t", "mangle", "-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "ACCEPT")
    # And another nftdivert instance, with a table (and tag) of its own.
    cli.ok("apply", "-c", cli.config('table = "nftdivert2"\n' + XT, "other.toml"))

    def snapshot() -> dict[str, str]:
        snap = {t: cli.nft("list", "table", *t.split())
                for t in ("ip foreign", "inet docker_like", "inet nftdivert2")}
        snap["ipv4 raw"] = "\n".join(l for l in cli.xt_save("ipv4").splitlines() if "someone else" in l)
        snap["ipv6 mangle"] = "\n".join(l for l in cli.xt_save("ipv6").splitlines() if "--dport 443" in l)
        snap["other xt"] = "\n".join(cli.xt_tagged("ipv4", "nftdivert:nftdivert2")
                                     + cli.xt_tagged("ipv6", "nftdivert:nftdivert2"))
        return snap

    before = snapshot()
    assert before["ipv4 raw"] and before["ipv6 mangle"] and before["other xt"].count("\n") == 3
    cli.ok("apply", "-c", cli.config(XT))
    assert snapshot() == before
    assert len(cli.xt_tagged("ipv4")) == 2
    cli.ok("apply", "-c", cli.config(XT))
    assert snapshot() == before
    out = cli.ok("remove").stdout
    assert "table inet nftdivert," in out and "4 xt queue rule(s)" in out
    assert snapshot() == before
    assert cli.xt_tagged("ipv4") == [] and cli.xt_tagged("ipv6") == []
    # The tables iptables-nft made stay: they hold someone else's rules.
    tables = cli.nft("list", "tables")
    assert "table ip raw" in tables and "table ip6 mangle" in tables
    assert re.search(r"^table inet nftdivert2$", tables, re.M)
    assert not re.search(r"^table inet nftdivert$", tables, re.M)


# ---- diff ----------------------------------------------------------------------------------

def test_diff_lifecycle(cli):
    cfg = cli.config(XT)
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 1, "nothing loaded is drift"
    assert "not loaded" in proc.stderr
    assert "+table inet nftdivert {" in proc.stdout

    cli.ok("apply", "-c", cfg)
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "" and "matches the config" in proc.stderr

    cli.nft("add", "rule", "inet", "nftdivert", "divert_unbound", "tcp", "dport", "5", "drop")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 1
    changed = [l for l in proc.stdout.splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    assert changed == ["-\t\ttcp dport 5 drop"], proc.stdout

    cli.ok("apply", "-c", cfg)
    assert cli("diff", "-c", cfg).returncode == 0

    # Bound-port sets change at run time by design: no drift.
    cli.nft("add", "element", "inet", "nftdivert", "bound_tcp_v4", "{ 0.0.0.0/0 . 4444 }")
    cli.nft("add", "element", "inet", "nftdivert", "bound_udp_v6", "{ ::1 . 53, ::/0 . 4445 }")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 0, proc.stdout
    # So do the admission sets (each client address with its token bucket) and counters.
    cli.nft("add", "element", "inet", "nftdivert", "admit_tcp_v4",
            "{ 192.0.2.9 limit rate over 1000/second burst 500 packets, 192.0.2.10 }")
    cli.nft("add", "element", "inet", "nftdivert", "admit_udp_v6", "{ 2001:db8::9 }")
    assert "192.0.2.9 limit rate over" in cli.nft("list", "set", "inet", "nftdivert", "admit_tcp_v4")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 0, proc.stdout

    # ...but left-alone sets are config, so a hand-made element is drift.
    cli.nft("add", "element", "inet", "nftdivert", "leave_alone_tcp_ports", "{ 4444 }")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 1 and "4444" in proc.stdout


def test_diff_sees_xt_rule_drift(cli):
    cfg = cli.config(XT)
    cli.ok("apply", "-c", cfg)
    cli.host.run("iptables-nft", "-t", "raw", "-D", "OUTPUT", "1")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 1
    assert re.search(r"^\+# xt: ipv4 raw -A OUTPUT .*NFQUEUE --queue-num 64$", proc.stdout, re.M), proc.stdout
    cli.ok("apply", "-c", cfg)
    assert cli("diff", "-c", cfg).returncode == 0


def test_diff_sees_a_config_change(cli):
    cli.ok("apply", "-c", cli.config(XT))
    proc = cli("diff", "-c", cli.config('[leave_alone]\ntcp_ports = [22]\n' + XT, "new.toml"))
    assert proc.returncode == 1
    assert re.search(r"^\+\s+elements = \{ 22 \}$", proc.stdout, re.M), proc.stdout


# ---- remove --------------------------------------------------------------------------------

def test_remove_leaves_nothing(cli):
    assert cli.nft("list", "ruleset") == ""
    cli.ok("apply", "-c", cli.config('mode = "both"\n' + XT))
    assert cli.xt_tagged("ipv4") and cli.xt_tagged("ipv6")
    out = cli.ok("remove").stdout
    assert "removed table inet nftdivert" in out
    assert cli.nft("list", "ruleset") == ""
    for family in ("ipv4", "ipv6"):
        assert "NFQUEUE" not in cli.xt_save(family)
    again = cli.ok("remove").stdout
    assert "nothing to remove" in again
    assert cli.nft("list", "ruleset") == ""


def test_remove_by_config_table_name(cli):
    cfg = cli.config('table = "lab"\n' + XT)
    cli.ok("apply", "-c", cfg)
    assert "nothing to remove" in cli.ok("remove").stdout  # the default name is not ours here
    assert "table inet lab" in cli.nft("list", "tables")
    assert "removed table inet lab" in cli.ok("remove", "-c", cfg).stdout
    assert cli.nft("list", "ruleset") == ""


def test_remove_refuses_a_bad_table_name(cli):
    proc = cli("remove", "-t", "a;b")
    assert proc.returncode == 2 and "table" in proc.stderr


# ---- check ---------------------------------------------------------------------------------

def test_check_reports_the_auto_backend(cli):
    proc = cli.ok("check")
    want = "nft" if cli.native_queue() else "xt"
    assert f"queue backend: {want} (auto:" in proc.stdout
    assert "accepted by the kernel" in proc.stdout
    assert cli.nft("list", "ruleset") == ""  # a dry run changes nothing


@pytest.mark.vm
def test_auto_picks_the_native_backend_where_the_kernel_has_it(cli):
    # On a stock kernel (the VM tier) that must be nft; on kernels without
    # CONFIG_NFT_QUEUE (this project's own machines) xt.
    want = "nft" if cli.native_queue() else "xt"
    if os.environ.get("NFTDIVERT_IN_VM"):
        assert want == "nft", "the stock distribution kernel should accept the nft queue statement"
    # `check` asks the same question (test_check_reports_the_auto_backend);
    # one command here, because each costs seconds under emulation.
    assert f"queue backend: {want} (auto:" in cli.ok("apply").stdout
    queued_natively = any("queue" in expr for o in cli.nft_json("list", "table", "inet", "nftdivert")
                          if "rule" in o for expr in o["rule"]["expr"])
    assert queued_natively == (want == "nft")
    assert bool(cli.xt_tagged("ipv4")) == (want == "xt")


def test_check_of_a_native_config_on_this_kernel(cli):
    # The VM tier's acceptance of the native form: test_auto_picks_... there.
    cfg = cli.config('[queue]\nbackend = "nft"\n')
    proc = cli("check", "-c", cfg)
    if cli.native_queue():
        assert proc.returncode == 0
    else:
        assert proc.returncode == 1
        assert "queue num 0" in proc.stderr and "No such file or directory" in proc.stderr
    assert cli.nft("list", "ruleset") == ""


def test_check_ruleset_files(cli, tmp_path):
    good = tmp_path / "good.nft"
    good.write_text(render.render_for(load(None), "xt"))
    proc = cli.ok("check", str(good))
    assert "accepted by the kernel" in proc.stdout

    broken = tmp_path / "broken.nft"
    broken.write_text(good.read_text().replace("ct direction reply return", "ct direction sideways return"))
    proc = cli("check", str(broken))
    assert proc.returncode == 1
    assert "sideways" in proc.stderr and f"{broken}:" in proc.stderr  # nft names the user's file
    assert cli.nft("list", "ruleset") == ""

    proc = cli("check", "-c", str(tmp_path / "x.toml"), str(good))
    assert proc.returncode == 2


def _userns_allowed(cli) -> bool:
    probe = cli.host.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                         "unshare", "-Urn", "true", check=False)
    return probe.returncode == 0


def test_check_as_non_root(cli, public_dir):
    ruleset = public_dir / "default-xt.nft"
    ruleset.write_text(render.render_for(load(None), "xt"))
    ruleset.chmod(0o644)
    proc = cli("check", user=65534)
    proc_file = cli("check", str(ruleset), user=65534)
    if _userns_allowed(cli):
        assert proc.returncode == 0, proc.stderr
        assert "dry run in a user namespace" in proc.stdout
        assert re.search(r"queue backend: (nft|xt) \(auto: probed in a user namespace\)", proc.stdout)
        assert proc_file.returncode == 0, proc_file.stderr
    else:
        for p in (proc, proc_file):
            assert p.returncode == 1
            assert "unprivileged user namespaces are off" in p.stderr
            assert "Traceback" not in p.stderr
    assert cli.nft("list", "ruleset") == ""


def test_root_only_commands_refuse_non_root(cli):
    proc = cli("apply", user=65534)
    assert proc.returncode == 1
    assert "run it as root" in proc.stderr
    assert cli.nft("list", "ruleset") == ""


# ---- status --------------------------------------------------------------------------------

def test_status(cli):
    proc = cli("status")
    assert proc.returncode == 1 and "not loaded" in proc.stdout

    cli.ok("apply", "-c", cli.config(XT))
    out = cli.ok("status").stdout
    assert "loaded, queue backend xt" in out
    rows = {m.group(1): (m.group(2), int(m.group(3)))
            for m in re.finditer(r"^\s+(\w+)\s+(\S+)\s+(-?\d+)\s+\d+$", out, re.M)}
    assert rows["answer_for_all"] == ("prerouting", -100)
    assert rows["divert_incoming"] == ("input", -151)
    assert rows["restore_replies"] == ("output", -301)
    assert rows["contain"] == ("forward", 0)
    assert rows["divert_unbound"][0] == "-"
    assert out.count("xt: ipv") == 4
    assert "leave_alone_hosts_v4=0" in out
    assert "admission: dropped tcp 0, udp 0 new conversations" in out
    assert rows["drop_spoofed"] == ("prerouting", -299)
    assert "spoofed: dropped 0 packets from sources their interface does not route to" in out

    cli.ok("remove")
    proc = cli("status")
    assert proc.returncode == 1 and "not loaded" in proc.stdout


def test_status_names_stray_xt_rules(cli):
    cli.ok("apply", "-c", cli.config(XT))
    cli.nft("delete", "table", "inet", "nftdivert")
    proc = cli("status")
    assert proc.returncode == 1
    assert "not loaded" in proc.stdout and proc.stdout.count("stray xt rule") == 4


# ---- scale ---------------------------------------------------------------------------------

def test_ten_thousand_left_alone_networks(cli):
    cfg = str(GOLDEN_DIR / "bignets.toml")
    t0 = time.perf_counter()
    rendered = cli.ok("render", "-c", cfg).stdout
    t1 = time.perf_counter()
    cli.ok("apply", "-c", cfg)
    t2 = time.perf_counter()
    print(f"\n10,000 networks: render {t1 - t0:.2f}s, apply {t2 - t1:.2f}s (CLI, including Python start-up)")
    assert rendered.count("\t\t\t198.18.") == 10_000
    objects = cli.nft_json("list", "set", "inet", "nftdivert", "leave_alone_hosts_v4")
    elements = next(o["set"] for o in objects if "set" in o)["elem"]
    # Every other address, so nothing merges: each network is its own element.
    assert len(elements) == 10_000
    assert "198.18.0.0" in elements and "198.18.78.30" in elements
    t3 = time.perf_counter()
    assert cli("diff", "-c", cfg).returncode == 0
    print(f"10,000 networks: diff {time.perf_counter() - t3:.2f}s")


# ---- xt backend: fail-open and re-apply ----------------------------------------------------

def test_xt_fail_open_and_reapply_keeps_exactly_two_rules_per_family(cli):
    cfg = cli.config('[queue]\nbackend = "xt"\nfail = "open"\n')
    assert cli.ok("render", "-c", cfg).stdout.count("--queue-bypass") == 4
    cli.ok("apply", "-c", cfg)

    def rules() -> dict[str, list[str]]:
        return {f: cli.xt_tagged(f) for f in ("ipv4", "ipv6")}

    first = rules()
    for family, lines in first.items():
        assert len(lines) == 2, (family, lines)
        assert all(line.endswith("--queue-bypass") for line in lines)
    handles = cli.nft("-a", "list", "chain", "ip", "raw", "OUTPUT")
    cli.ok("apply", "-c", cfg)
    cli.ok("apply", "-c", cfg)
    assert rules() == first
    # Kept, not deleted and re-added: no moment in which nothing is queued.
    assert cli.nft("-a", "list", "chain", "ip", "raw", "OUTPUT") == handles

    # A changed config replaces them, still two per family.
    closed = cli.config('[queue]\nbackend = "xt"\nincoming = 5\noutgoing = 6\n', "closed.toml")
    cli.ok("apply", "-c", closed)
    for family, lines in rules().items():
        assert len(lines) == 2
        assert not any("--queue-bypass" in line for line in lines)
        assert sorted(re.search(r"--queue-num (\d+)", line).group(1) for line in lines) == ["5", "6"]

    # An IPv4-only config takes the IPv6 rules away.
    cli.ok("apply", "-c", cli.config('ipv6 = false\n' + XT, "v4.toml"))
    assert len(cli.xt_tagged("ipv4")) == 2 and cli.xt_tagged("ipv6") == []


# ---- the bridge table ----------------------------------------------------------------------

def _bridge(cli: Cli, name: str, ports: int) -> str:
    """A bridge with `ports` veth ports (their peers unattached); its address."""
    cli.host.run("ip", "link", "add", name, "type", "bridge")
    for i in range(ports):
        cli.host.run("ip", "link", "add", f"{name}p{i}", "type", "veth", "peer", "name", f"{name}x{i}")
        cli.host.run("ip", "link", "set", f"{name}p{i}", "master", name)
    return json.loads(cli.host.run("ip", "-j", "link", "show", name).stdout)[0]["address"]


def _client_ports(cli: Cli) -> dict[str, str]:
    maps = [o["map"] for o in cli.nft_json("list", "map", "bridge", "nftdivert", "client_ports") if "map" in o]
    return dict(maps[0].get("elem", []))


def test_bridge_table_lifecycle(cli):
    """Gateway mode: apply fills the map with the client-side bridges' ports
    (all bridges, or those `interfaces` names); check says so; status and diff
    see the table; another mode and remove take it away."""
    lan = _bridge(cli, "lan0", 2)
    _bridge(cli, "wan0", 1)
    out = cli.ok("check", "-c", cli.config(XT)).stdout
    assert "bridge lan0 (2 ports): what its clients send each other goes to this host" in out, out
    assert "bridge wan0 (1 port)" in out, out

    cfg = cli.config('interfaces = ["lan*"]\n' + XT, "lan.toml")
    assert "bridge wan0" not in cli.ok("check", "-c", cfg).stdout
    cli.ok("apply", "-c", cfg)
    assert _client_ports(cli) == {"lan0p0": lan, "lan0p1": lan}
    chains = cli.chains("bridge nftdivert")
    assert {(n, c["hook"], c["prio"]) for n, c in chains.items()} == \
           {("lateral", "prerouting", -300), ("lateral_copies", "forward", -200)}
    status = cli.ok("status").stdout
    assert re.search(r"^\s+lateral\s+prerouting\s+-300\s+0$", status, re.M) and "client_ports=2" in status, status
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 0, proc.stdout  # the map's elements change at run time: no drift
    cli.nft("add", "rule", "bridge", "nftdivert", "lateral", "counter")
    proc = cli("diff", "-c", cfg)
    assert proc.returncode == 1 and "-\t\tcounter" in proc.stdout, proc.stdout

    cli.ok("apply", "-c", cli.config(LOCAL_XT, "local.toml"))  # local mode has no bridge table
    assert "bridge" not in cli.nft("list", "tables")
    cli.ok("apply", "-c", cfg)
    assert "removed table inet nftdivert, table bridge nftdivert" in cli.ok("remove").stdout
    assert cli.nft("list", "ruleset") == ""
