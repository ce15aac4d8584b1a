"""The end-to-end lab: three hosts as network namespaces, `nftdivert run` in
the middle, packet captures, and the client programs.

    client (192.0.2.2, 2001:db8:1::2)
      | eth0
      | to-client (192.0.2.1, 2001:db8:1::1)
    diverter: ip_forward on, nftdivert run
      | to-inet (203.0.113.1, 2001:db8:2::1)
      | eth0
    internet (203.0.113.2, 2001:db8:2::2): tcpdump for the whole module

The client's default routes point at the diverter and the diverter's at the
internet host, so without nftdivert the client's packets to any address WOULD
reach the internet host: containment is what stops them, and the capture
there proves it. No packet ever leaves these namespaces.

Run as a script (inside a namespace) this file is also the client side:
    python harness.py tcp HOST PORT PAYLOAD [--timeout S]   one TCP exchange, JSON out
    python harness.py udp HOST PORT PAYLOAD [--timeout S]   one datagram and its answer
    python harness.py many --json TARGETS                    concurrent TCP exchanges
    python harness.py talk --json STEPS                      TCP and UDP exchanges, one after another
    python harness.py fan-out tcp|udp --sport N --json TARGETS  one client port, many destinations
    python harness.py from-ports --json TARGETS [--half-close]  TCP exchanges, each from its own fixed port
    python harness.py bulk HOST PORT MEGABYTES               byte-exact transfer, sha256
    python harness.py serve-tcp PORT REPLY                   a tiny server of its own
    python harness.py bind-race tcp|udp NETNS HOST --json J  bind in NETNS, then at once ask HOST from here
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LAB_PY = str(Path(__file__).resolve())
BACKEND = os.environ.get("NFTDIVERT_TEST_BACKEND", "auto")
# Which divert path the end-to-end suites run on: `make test` runs them on both.
DIVERT_PATH = os.environ.get("NFTDIVERT_TEST_PATH", "queue")
DIVERT_PATH_LINE = f'divert_path = "{DIVERT_PATH}"\n'
KERNEL_PATH = DIVERT_PATH == "kernel"
TABLE = "nftdivert"
# Queue workers a default run has (queue.workers = 0: one per CPU it may use, as this process may),
# and the queues they bind: incoming 0.., outgoing 64..
WORKERS = 0 if KERNEL_PATH else min(len(os.sched_getaffinity(0)), 64)
QUEUES = (0, 64)
ALL_QUEUES = tuple(q + k for q in QUEUES for k in range(max(WORKERS, 1)))


def client_queues(address: str, workers: int = WORKERS) -> tuple[tuple[str, int], tuple[str, int]]:
    """((name, number) of the incoming queue, the same of the outgoing) of the worker that owns
    the client at `address`, as the counters name them ("incoming", or "incoming-1" among several)."""
    import ipaddress

    from nftdivert.worker.spread import worker_for

    if workers <= 1:
        return ("incoming", QUEUES[0]), ("outgoing", QUEUES[1])
    k = worker_for(ipaddress.ip_address(address).packed, workers)
    return (f"incoming-{k}", QUEUES[0] + k), (f"outgoing-{k}", QUEUES[1] + k)
LISTENER_PORT = 1337

CLIENT4, CLIENT6 = "192.0.2.2", "2001:db8:1::2"
DIV_CLIENT4, DIV_CLIENT6 = "192.0.2.1", "2001:db8:1::1"
DIV_INET4, DIV_INET6 = "203.0.113.1", "2001:db8:2::1"
INET4, INET6 = "203.0.113.2", "2001:db8:2::2"
DIV_CLIENT_IF, DIV_INET_IF = "to-client", "to-inet"

# Everything the client could send toward the internet: its own link's
# sources, and the documentation destinations the tests divert.
LEAK_FILTER = ("src net 192.0.2.0/24 or src net 2001:db8:1::/64 "
               "or dst net 198.51.100.0/24 or dst net 2001:db8:ffff::/64")

QUIET_SYSCTLS = ("accept_ra=0", "autoconf=0", "router_solicitations=0", "accept_dad=0")


def _env() -> dict:
    """For nftdivert_argv(): the standard library, the checkout, then the package
    directories `site` gave this interpreter (the venv's, the system's with
    `nftables`). The standard library first, as `site` would order it: every
    import then finds it at the first place it looks, which saves thousands
    of stat() calls per process on the VM tier's shared file system."""
    stdlib = sysconfig.get_path("stdlib")
    packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    path = [stdlib, os.path.join(stdlib, "lib-dynload"), str(REPO), *packages]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def nftdivert_argv(*args: str) -> list[str]:
    """`nftdivert ARGS` from the checkout. -S: with the import path given in
    _env(), `site` adds nothing but its .pth hooks, which cost seconds per
    process under emulation (the VM tier). Run it with env=_env()."""
    return [sys.executable, "-S", "-m", "nftdivert", *args]


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.05,
              detail: Callable[[], str] | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


# ---- hosts ---------------------------------------------------------------------

def quiet(ns) -> None:
    """No router solicitations or autoconf on links made from now on in `ns`."""
    ns.run("sysctl", "-qw", *(f"net.ipv6.conf.{conf}.{s}" for conf in ("all", "default") for s in QUIET_SYSCTLS))


def build_gateway_lab(netns_mod):
    """client, diverter, internet: linked, addressed, routed. Returns the three."""
    client = netns_mod.create("client")
    diverter = netns_mod.create("diverter")
    internet = netns_mod.create("internet")
    made = [client, diverter, internet]
    try:
        for ns in made:
            quiet(ns)
        netns_mod.link(client, "eth0", [f"{CLIENT4}/24", f"{CLIENT6}/64"],
                       diverter, DIV_CLIENT_IF, [f"{DIV_CLIENT4}/24", f"{DIV_CLIENT6}/64"])
        netns_mod.link(diverter, DIV_INET_IF, [f"{DIV_INET4}/24", f"{DIV_INET6}/64"],
                       internet, "eth0", [f"{INET4}/24", f"{INET6}/64"])
        client.run("ip", "route", "add", "default", "via", DIV_CLIENT4)
        client.run("ip", "-6", "route", "add", "default", "via", DIV_CLIENT6)
        diverter.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        diverter.run("ip", "route", "add", "default", "via", INET4)
        diverter.run("ip", "-6", "route", "add", "default", "via", INET6)
        internet.run("ip", "route", "add", "192.0.2.0/24", "via", DIV_INET4)
        internet.run("ip", "-6", "route", "add", "2001:db8:1::/64", "via", DIV_INET6)
        # The lab routes: without nftdivert, the client reaches the internet host.
        client.run("ping", "-c1", "-W5", INET4, timeout=10)
        client.run("ping", "-6", "-c1", "-W5", INET6, timeout=10)
    except BaseException:
        for ns in reversed(made):
            ns.delete()
        raise
    return client, diverter, internet


def build_local_host(netns_mod):
    """One host for local mode: a link to nowhere (a veth pair whose other end
    has no address) carries the default routes, so a connect to any address
    leaves through it and goes unanswered unless diverted."""
    host = netns_mod.create("local")
    try:
        quiet(host)
        host.run("ip", "link", "add", "out0", "type", "veth", "peer", "name", "void0")
        host.run("ip", "addr", "add", "192.0.2.10/24", "dev", "out0")
        host.run("ip", "addr", "add", "2001:db8:1::10/64", "dev", "out0", "nodad")
        host.run("ip", "link", "set", "void0", "up")
        host.run("ip", "link", "set", "out0", "up")
        host.run("ip", "route", "add", "default", "dev", "out0")
        host.run("ip", "-6", "route", "add", "default", "dev", "out0")
    except BaseException:
        host.delete()
        raise
    return host


# ---- the config ------------------------------------------------------------------

def config_text(*, mode: str = "gateway", fail: str = "closed", tcp_ports=(), udp_ports=(),
                hosts=(), users=(), after_stop: str = "keep", new_tcp_per_source: int | None = None,
                close_grace: float | None = None, workers: int | None = None) -> str:
    # JSON lists of strings and integers are valid TOML arrays.
    return "\n".join([
        f'mode = "{mode}"',
        f'divert_path = "{DIVERT_PATH}"',
        *([f'containment_after_stop = "{after_stop}"'] if after_stop != "keep" else []),
        "",
        "[queue]",
        f'backend = "{BACKEND}"',
        f'fail = "{fail}"',
        *([f"new_tcp_per_source = {new_tcp_per_source}"] if new_tcp_per_source is not None else []),
        *([f"workers = {workers}"] if workers is not None else []),
        "",
        "[leave_alone]",
        f"tcp_ports = {json.dumps(list(tcp_ports))}",
        f"udp_ports = {json.dumps(list(udp_ports))}",
        f"hosts = {json.dumps(list(hosts))}",
        f"users = {json.dumps(list(users))}",
        "",
        *(["[worker]", f"close_grace = {close_grace}", ""] if close_grace is not None else []),
    ])


# Given [[listeners]] replace the defaults: a config that adds one starts with these.
ECHO_LISTENERS = """
[[listeners]]
name = "tcp-echo"
protocol = "tcp"
port = 1337

[[listeners]]
name = "udp-echo"
protocol = "udp"
port = 1337
"""
DNS_LISTENER = """
[[listeners]]
name = "dns"
protocol = "udp"
port = 53
kind = "dns"
"""


# ---- the kernel's view -------------------------------------------------------------

def sandbox_records(work: Path, top: str, sections: str, script: str, timeout: int = 150, **env: str) -> list[dict]:
    """Run `script` in `nftdivert sandbox` in `work` ($D) with a config of the `top` level keys, the
    path's and backend's lines, then `sections`; return the log's records."""
    path = work / "sandbox.toml"
    path.write_text(top + DIVERT_PATH_LINE + f'[queue]\nbackend = "{BACKEND}"\n' + sections)
    env = dict(os.environ, PYTHONPATH=str(REPO), D=str(work), **env)
    env.pop("SUDO_UID", None)
    # Not nftdivert_argv: the clients inside see this environment, with site's own paths.
    argv = [sys.executable, "-m", "nftdivert", "sandbox", "-c", str(path), "--timeout", str(timeout), "--", "sh", "-c"]
    proc = subprocess.run([*argv, script], capture_output=True, text=True, env=env, timeout=timeout + 60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def nft_json(ns, *args: str) -> list[dict]:
    proc = ns.run("nft", "-j", *args, check=False)
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout).get("nftables", [])


def table_handle(ns, table: str = TABLE) -> int | None:
    for o in nft_json(ns, "list", "tables"):
        t = o.get("table")
        if t and t["family"] == "inet" and t["name"] == table:
            return t["handle"]
    return None


def active_backend(ns, table: str = TABLE) -> str | None:
    """Which queue backend the loaded table uses: the kernel says (None: no table)."""
    objects = nft_json(ns, "list", "table", "inet", table)
    if not objects:
        return None
    if any(o.get("chain", {}).get("name") == "redirect_from_clients" for o in objects):
        return "none"  # the kernel path queues nothing
    native = any("queue" in expr for o in objects if "rule" in o for expr in o["rule"]["expr"])
    return "nft" if native else "xt"


def xt_save(ns) -> str:
    return ns.run("iptables-nft-save").stdout + ns.run("ip6tables-nft-save").stdout


def nfqueue_rules(ns) -> list[str]:
    return [line for line in xt_save(ns).splitlines() if "NFQUEUE" in line]


def queue_bindings(ns) -> list[str]:
    """Lines of /proc/net/netfilter/nfnetlink_queue (this namespace) for our queues."""
    proc = ns.run("cat", "/proc/net/netfilter/nfnetlink_queue", check=False)
    return [line for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in {str(q) for q in ALL_QUEUES}]


def port_bound(ns, proto: str, port: int) -> bool:
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    return bool(ns.run("ss", flag, f"sport = :{port}", check=False).stdout.strip())


def nftdivert(ns, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return ns.run(*nftdivert_argv(*args), check=check, env=_env(), timeout=timeout)


def stats_writable() -> bool:
    """Can `nftdivert run` publish its counters (/run/nftdivert) on this machine?"""
    d = Path("/run/nftdivert")
    return os.access(d, os.W_OK) if d.exists() else os.access(d.parent, os.W_OK)


def port20_rules(ns) -> list[str]:
    """The routing rules active FTP's data connections add (priority 2020), IPv4 and IPv6."""
    return [line for family in ("-4", "-6")
            for line in ns.run("ip", family, "rule", "list", "priority", "2020", check=False).stdout.splitlines()
            if line.strip()]


def assert_clean(ns) -> None:
    """Nothing of nftdivert is left in `ns`: no ruleset at all, no xt rule, no queue bound,
    no routing rule of active FTP."""
    ruleset = ns.run("nft", "list", "ruleset").stdout
    assert ruleset.strip() == "", f"ruleset left behind in {ns.name}:\n{ruleset}"
    assert nfqueue_rules(ns) == [], f"NFQUEUE rules left behind: {nfqueue_rules(ns)}"
    assert queue_bindings(ns) == [], f"queues still bound: {queue_bindings(ns)}"
    assert port20_rules(ns) == [], f"routing rules left behind: {port20_rules(ns)}"
    assert state_files(ns) == [], f"state files left behind: {state_files(ns)}"


def state_files(ns) -> list[str]:
    """What a run keeps under /run/nftdivert for `ns` (its counters, ownership lock, analyses' socket)."""
    ino = os.stat(f"/run/netns/{ns.name}").st_ino
    return sorted(p.name for p in Path("/run/nftdivert").glob(f"*-{ino}.*"))


def assert_contained(ns, table: str = TABLE) -> None:
    """What a clean stop leaves by default: the table with its containment chain
    alone (a forward hook that drops), the bridge table that keeps clients of a
    bridge apart, and otherwise nothing: no xt rule, no queue bound."""
    objects = nft_json(ns, "list", "ruleset")
    tables = sorted((o["table"]["family"], o["table"]["name"]) for o in objects if "table" in o)
    assert tables == [("bridge", table), ("inet", table)], f"after a clean stop, {ns.name} holds {tables}"
    chains = [o["chain"] for o in objects if "chain" in o and o["chain"]["family"] == "inet"]
    assert [(c["name"], c.get("hook")) for c in chains] == [("contain", "forward")], chains
    bridged = [(o["chain"]["name"], o["chain"].get("hook")) for o in objects
               if "chain" in o and o["chain"]["family"] == "bridge"]
    assert bridged == [("lateral", "prerouting"), ("lateral_copies", "forward")], bridged
    rules = [o["rule"] for o in objects if "rule" in o and o["rule"]["family"] == "inet"]
    assert chains[0]["policy"] == "drop" or any("drop" in e for r in rules for e in r["expr"]), rules
    assert nfqueue_rules(ns) == [], f"NFQUEUE rules left behind: {nfqueue_rules(ns)}"
    assert queue_bindings(ns) == [], f"queues still bound: {queue_bindings(ns)}"
    assert port20_rules(ns) == [], f"routing rules left behind: {port20_rules(ns)}"
    assert state_files(ns) == [], f"state files left behind: {state_files(ns)}"


def state_files(ns) -> list[str]:
    """What a run keeps under /run/nftdivert for `ns` (its counters, ownership lock, analyses' socket)."""
    ino = os.stat(f"/run/netns/{ns.name}").st_ino
    return sorted(p.name for p in Path("/run/nftdivert").glob(f"*-{ino}.*"))


def keeps_containment(config: str) -> bool:
    """Does a clean stop of `nftdivert run` with this config leave containment?"""
    import tomllib

    from nftdivert import config as config_mod
    from nftdivert.ruleset import model

    return model.build(config_mod.from_mapping(tomllib.loads(config)), "nft").contain_after_stop


# ---- nftdivert run ---------------------------------------------------------------

class Diverter:
    """One `nftdivert run` process in a namespace, with its log and stderr in files."""

    def __init__(self, ns, workdir: Path, config: str, name: str = "run", args: tuple[str, ...] = ()) -> None:
        self.ns = ns
        self.args = args  # more options for `nftdivert run`
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log.jsonl"
        self.err_path = workdir / f"{name}.stderr"
        self.out_path = workdir / f"{name}.stdout"
        self.proc: subprocess.Popen | None = None
        self.killed = False

    # -- lifecycle
    def start(self, timeout: float = 60) -> "Diverter":
        stale = table_handle(self.ns)
        self.err_path.write_text("")
        with open(self.out_path, "w") as out, open(self.err_path, "a") as err:
            self.proc = self.ns.popen(
                *nftdivert_argv("run", "-c", str(self.config_path)),
                "--log", str(self.log_path), "--log-format", "json", *self.args, stdout=out, stderr=err, env=_env())

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nftdivert run exited {self.proc.returncode} while starting\n"
                                     f"stderr:\n{self.stderr()}")
            if not re.search(r"table inet \S+ applied; (queue backend|divert path)", self.stderr()):
                return False
            handle = table_handle(self.ns)
            return (handle is not None and handle != stale
                    and port_bound(self.ns, "tcp", LISTENER_PORT) and port_bound(self.ns, "udp", LISTENER_PORT))

        try:
            wait_for(ready, timeout, "nftdivert run to be ready (table applied, listeners bound)",
                     detail=lambda: f"stderr:\n{self.stderr()}")
        except BaseException:
            self.kill()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; returns the exit status (the caller asserts it)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"nftdivert run ignored SIGTERM for {timeout}s\nstderr:\n{self.stderr()}")

    def stop_and_check(self) -> None:
        """SIGTERM, exit 0, and nothing left but containment (when the config keeps
        it): no diverting table, xt rules, queue bindings or process."""
        pid = self.proc.pid
        rc = self.stop()
        assert rc == 0, f"nftdivert run exited {rc} on SIGTERM\nstderr:\n{self.stderr()}"
        assert pid not in self.ns.pids(), f"nftdivert run (pid {pid}) still in {self.ns.name}"
        if keeps_containment(self.config):
            assert_contained(self.ns)
        else:
            assert_clean(self.ns)
        err = self.stderr()
        assert "Traceback" not in err, err
        if KERNEL_PATH:  # no worker: the final counters are the kernel's and the log's
            assert re.search(r"kernel path: new conversations .*, failed 0\)", err), err
        else:  # the final counters: every packet got its verdict without an error
            assert re.search(r"malformed \d+, dropped \d+, errors 0;", err), f"the worker counted errors:\n{err}"

    def kill(self) -> None:
        """kill -9: no cleanup at all (the table and xt rules stay)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.killed = True

    # -- what it said
    def stderr(self) -> str:
        try:
            return self.err_path.read_text()
        except OSError:
            return ""

    def log(self) -> list[dict]:
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_log(self, pred: Callable[[dict], bool], timeout: float = 10, what: str = "a log line") -> dict:
        return wait_for(lambda: next((r for r in self.log() if pred(r)), None), timeout, what,
                        detail=lambda: f"log: {self.log()[-10:]}")


@contextmanager
def local_lab(netns_mod, workdir: Path, **config):
    """One host in local mode running `nftdivert run`: (host, Diverter). At the
    end the diverter must stop cleanly; the host goes, pass or fail."""
    host = build_local_host(netns_mod)
    div = None
    try:
        div = Diverter(host, workdir, config_text(mode="local", **config), name="local").start()
        yield host, div
        div.stop_and_check()
    finally:
        if div is not None:
            div.kill()
        host.delete()


# ---- a bridge of many clients ---------------------------------------------------------

BRIDGE = "clients0"  # the diverter's client-side bridge, addressed DIV_CLIENT4 and DIV_CLIENT6


def bridge_client(i: int, version: int = 4) -> str:
    """The address of client i on the bridge."""
    return f"192.0.2.{10 + i}" if version == 4 else f"2001:db8:1::{10 + i:x}"


class BridgeLab:
    """A diverter whose clients share one bridge: `n` client namespaces, each
    on a port of it (pI), addressed bridge_client(i), routed through the
    diverter. Nothing else: its containment keeps every packet in here.
    Clients of one bridge reach each other without the diverter's IP stack
    unless the bridge table sends them up; the bridge's netfilter setting
    (bridge_netfilter) is per namespace."""

    def __init__(self, netns_mod, workdir: Path, n: int) -> None:
        self.workdir = workdir
        self.diverter_ns = netns_mod.create("bridge-div")
        self.clients: list = []
        try:
            quiet(self.diverter_ns)
            self.diverter_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
            self._batch(self.diverter_ns, [f"link add {BRIDGE} type bridge",
                                           f"addr add {DIV_CLIENT4}/24 dev {BRIDGE}",
                                           f"addr add {DIV_CLIENT6}/64 dev {BRIDGE} nodad", f"link set {BRIDGE} up"])
            for i in range(n):
                self.add_client(netns_mod, i)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _batch(ns, commands: list[str]) -> None:
        ns.run("ip", "-batch", "-", input="".join(c + "\n" for c in commands))

    def add_client(self, netns_mod, i: int, port_address: str | None = None):
        """Client i on port pI (`port_address`: that port's MAC, which the bridge
        takes as its own when it is the lowest of its ports)."""
        client = netns_mod.create(f"bridge-c{i}")
        self.clients.append(client)
        quiet(client)
        subprocess.run(["ip", "link", "add", "eth0", "netns", client.name, "type", "veth", "peer", "name", f"p{i}",
                        "netns", self.diverter_ns.name], check=True, capture_output=True)
        self._batch(self.diverter_ns, [*([f"link set p{i} address {port_address}"] if port_address else []),
                                       f"link set p{i} master {BRIDGE}", f"link set p{i} up"])
        self._batch(client, [f"addr add {bridge_client(i)}/24 dev eth0",
                             f"addr add {bridge_client(i, 6)}/64 dev eth0 nodad", "link set eth0 up",
                             f"route add default via {DIV_CLIENT4}", f"route add default via {DIV_CLIENT6}"])
        return client

    def remove_client(self, client) -> None:
        """Its namespace goes, and with it its veth pair: the bridge loses the port."""
        self.clients.remove(client)
        client.delete()

    def bridge_address(self) -> str:
        return json.loads(self.diverter_ns.run("ip", "-j", "link", "show", BRIDGE).stdout)[0]["address"]

    def client_ports(self) -> dict[str, str]:
        """The bridge table's map: port name -> the address its frames to other clients get."""
        maps = [o["map"] for o in nft_json(self.diverter_ns, "list", "map", "bridge", TABLE, "client_ports")
                if "map" in o]
        return dict(maps[0].get("elem", [])) if maps else {}

    def bridge_netfilter(self, on: bool) -> None:
        """Whether the bridge passes its frames to the IP hooks (br_netfilter), in the diverter's namespace."""
        v = int(on)
        self.diverter_ns.run("sysctl", "-qw", f"net.bridge.bridge-nf-call-iptables={v}",
                             f"net.bridge.bridge-nf-call-ip6tables={v}")

    def close(self) -> None:
        for ns in [*reversed(self.clients), self.diverter_ns]:
            ns.delete()


# ---- captures -------------------------------------------------------------------

class Capture:
    """tcpdump on one interface of a namespace, into a pcap file."""

    def __init__(self, ns, iface: str, path: Path, bpf: str = "") -> None:
        self.ns, self.iface, self.path, self.bpf = ns, iface, path, bpf
        self.err_path = path.with_suffix(".stderr")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Capture":
        with open(self.err_path, "w") as err:
            self.proc = self.ns.popen(
                "tcpdump", "-i", self.iface, "-nn", "-U", "--immediate-mode", "-Z", "root",
                "-w", str(self.path), *shlex.split(self.bpf), stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: "listening on" in self.err_path.read_text() or self.proc.poll() is not None,
                 20, f"tcpdump on {self.ns.name}/{self.iface}")
        assert self.proc.poll() is None, f"tcpdump failed: {self.err_path.read_text()}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            time.sleep(0.2)  # the last packets on their way into the buffer
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def read(self, bpf: str = "") -> list[str]:
        """The captured packets, one `tcpdump -nn -r` line each (optionally filtered)."""
        proc = subprocess.run(["tcpdump", "-nn", "-r", str(self.path), *shlex.split(bpf)],
                              capture_output=True, text=True, timeout=30)
        # A capture still running may end in a packet half written: tolerate that.
        return [line for line in proc.stdout.splitlines() if line.strip()]


# ---- the gateway lab ---------------------------------------------------------------

class GatewayLab:
    """Module-wide: the three hosts, the internet capture and a diverter that
    tests (re)start with the config they need via `ensure(**config)`."""

    def __init__(self, netns_mod, workdir: Path) -> None:
        self.workdir = workdir
        self.client, self.diverter_ns, self.internet = build_gateway_lab(netns_mod)
        self.hosts = [self.client, self.diverter_ns, self.internet]
        self.internet_capture = Capture(self.internet, "eth0", workdir / "internet.pcap").start()
        # A packet the capture must see (from the diverter itself, not the
        # client): proves the capture works, so zero leaks means something.
        self.diverter_ns.run("ping", "-c1", "-W5", INET4, timeout=10)
        self.div: Diverter | None = None
        self._config: str | None = None
        self._runs = 0
        # Below the ephemeral range (32768-60999): a port the kernel chose for an
        # earlier test's connection may still sit in TIME_WAIT towards the same place.
        self._ports = iter(range(20000, 30000))

    def fresh_port(self) -> int:
        return next(self._ports)

    # -- the diverter
    def ensure(self, **config) -> Diverter:
        """A running diverter with exactly this config (reused when it already runs)."""
        text = config_text(**config)
        if self.div is not None and self.div.alive() and self._config == text \
                and table_handle(self.diverter_ns) is not None:
            return self.div
        self.stop()
        self._runs += 1
        self.div = Diverter(self.diverter_ns, self.workdir, text, name=f"run{self._runs}").start()
        self._config = text
        return self.div

    def stop(self) -> None:
        """Stop the diverter: a healthy one must clean up after itself but for
        containment; that, and what a killed one left behind, `remove` takes away."""
        div, self.div, self._config = self.div, None, None
        if div is None:
            return
        if div.alive():
            div.stop_and_check()
        # What a clean stop kept, or a killed one left behind: `remove` takes all of it.
        nftdivert(self.diverter_ns, "remove")
        assert_clean(self.diverter_ns)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.internet_capture.stop()
            for ns in reversed(self.hosts):
                ns.delete()

    # -- what the internet saw
    def leaks(self) -> list[str]:
        return self.internet_capture.read(LEAK_FILTER)

    def assert_no_leaks(self) -> None:
        leaks = self.leaks()
        assert leaks == [], f"the internet host received {len(leaks)} packet(s) from the client:\n" + \
            "\n".join(leaks[:20])

    def assert_capture_works(self) -> None:
        seen = self.internet_capture.read(f"icmp and src host {DIV_INET4}")
        assert seen, "the internet capture missed the diverter's own ping: it proves nothing"

    # -- the client
    def client_run(self, *args: str, timeout: float = 30, user: int | None = None) -> dict:
        return run_client(self.client, *args, timeout=timeout, user=user)

    def tcp(self, host: str, port: int, payload: str, timeout: float = 3) -> dict:
        return self.client_run("tcp", host, str(port), payload, "--timeout", str(timeout), timeout=timeout + 20)

    def udp(self, host: str, port: int, payload: str, timeout: float = 3) -> dict:
        return self.client_run("udp", host, str(port), payload, "--timeout", str(timeout), timeout=timeout + 20)

    def log_barrier(self, div: Diverter) -> list[dict]:
        return log_barrier(self.client, div, self.fresh_port())

    def start_over_stale(self, **config) -> Diverter:
        """Start a diverter WITHOUT cleaning up first (after a kill -9: the
        stale table and xt rules are still there; `run` must cope)."""
        text = config_text(**config)
        self._runs += 1
        self.div = Diverter(self.diverter_ns, self.workdir, text, name=f"run{self._runs}").start()
        self._config = text
        return self.div

    def origin_scenario(self, pcap: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
        """`echo fdsa | nc -v -q1 198.51.100.7 45678` from the client, with a
        capture of port 45678 on the client's link. Returns (nc, packets)."""
        cap = Capture(self.client, "eth0", pcap, "tcp port 45678").start()
        try:
            nc = self.client.sh("echo fdsa | nc -v -q1 -w3 198.51.100.7 45678", check=False, timeout=30)
        finally:
            cap.stop()
        return nc, cap.read()

    def assert_origin_scenario(self, div: Diverter, pcap: Path) -> None:
        nc, packets = self.origin_scenario(pcap)
        assert nc.returncode == 0 and nc.stdout == "fdsa\n", \
            f"nc exited {nc.returncode}, stdout {nc.stdout!r}, stderr {nc.stderr!r}\npackets:\n" + "\n".join(packets)
        assert "succeeded" in nc.stderr, nc.stderr
        synacks = [p for p in map(parse_tcp, packets) if p and p["flags"] == "S."]
        assert synacks, "no SYN/ACK captured on the client:\n" + "\n".join(packets)
        assert all(p["src"] == ("198.51.100.7", 45678) for p in synacks), \
            "a SYN/ACK came from somewhere else:\n" + "\n".join(packets)
        client_port = synacks[0]["dst"][1]
        rec = div.wait_log(lambda r: r["client"] == f"{CLIENT4}:{client_port}" and r["event"] == "start",
                           what=f"the start record of client port {client_port}")
        assert rec["v"] == 1 and rec["original_destination"] == "198.51.100.7:45678", rec
        assert rec["protocol"] == "tcp" and rec["listener"] == "tcp-echo", rec
        assert rec["listener_port"] == LISTENER_PORT and rec["interface"] == DIV_CLIENT_IF, rec


_TCPDUMP_TCP = re.compile(r"\bIP6? (\S+)\.(\d+) > (\S+)\.(\d+): Flags \[([^\]]+)\]")


def parse_tcp(line: str) -> dict | None:
    """A `tcpdump -nn` TCP line as {src: (addr, port), dst: (addr, port), flags}."""
    m = _TCPDUMP_TCP.search(line)
    if not m:
        return None
    return {"src": (m[1], int(m[2])), "dst": (m[3], int(m[4])), "flags": m[5], "line": line}


def log_barrier(ns, div: Diverter, port: int) -> list[dict]:
    """All log lines of conversations started so far, without end records: the
    log is written in order, so once a fresh conversation's start is there,
    earlier ones are too. Records of no conversation (an `admission` record:
    a burst may meet its client's share and be retried) are left out."""
    reply = run_client(ns, "udp", "198.51.100.250", str(port), f"barrier-{port}")
    assert reply["ok"], f"barrier datagram not answered: {reply}"
    div.wait_log(lambda r: r.get("original_destination") == f"198.51.100.250:{port}", what="the barrier's log line")
    return [r for r in div.log() if r.get("event") != "end" and "client" in r]  # a conversation's start and its records


def _client(*args: str) -> tuple[list[str], dict]:
    """argv and environment of this file as a client program. It needs only the
    standard library, so -S: under emulation (the VM tier) `site` costs seconds
    per process; and -m, so its bytecode is cached rather than compiled each time."""
    return [sys.executable, "-S", "-m", "harness", *args], dict(os.environ, PYTHONPATH=str(TESTS))


def run_client(ns, *args: str, timeout: float = 30, user: int | None = None) -> dict:
    if user is None:
        argv, env = _client(*args)
        proc = ns.run(*argv, check=False, timeout=timeout, env=env)
    else:  # the checkout may be out of the user's reach: a readable copy of this file
        import unprivileged  # not at the top: this file also runs as the client, alone
        proc = ns.run(*unprivileged.python("-S", unprivileged.script(LAB_PY), *args, uid=user), check=False,
                      timeout=timeout, env=unprivileged.env())
    assert proc.returncode == 0, f"client {args[0]} crashed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def serve_tcp(ns, port: int, reply: str, bind: str = "::") -> subprocess.Popen:
    """A tiny server of the host's own on `port` (`bind`: "::" is dual-stack,
    "0.0.0.0" IPv4 only, or one address); ready when this returns."""
    argv, env = _client("serve-tcp", str(port), reply, "--bind", bind)
    proc = ns.popen(*argv, text=True, env=env)
    wait_for(lambda: port_bound(ns, "tcp", port) or proc.poll() is not None, 60, f"own server on {port}")
    assert proc.poll() is None, f"own server on {port} failed: {proc.stderr.read()}"
    return proc


def receive_udp(ns, port: int, count: int, timeout: float = 10) -> subprocess.Popen:
    """A receiver of `count` datagrams on `port` (ready when this returns); its
    stdout ends with their sources as JSON."""
    argv, env = _client("recv-udp", str(port), str(count), "--timeout", str(timeout))
    proc = ns.popen(*argv, text=True, env=env)
    wait_for(lambda: port_bound(ns, "udp", port) or proc.poll() is not None, 60, f"receiver on {port}")
    assert proc.poll() is None, f"receiver on {port} failed"
    return proc


def serve_udp(ns, port: int, reply: str, bind: str = "::") -> subprocess.Popen:
    """Like serve_tcp, for UDP: answers each datagram with `reply`."""
    argv, env = _client("serve-udp", str(port), reply, "--bind", bind)
    proc = ns.popen(*argv, text=True, env=env)
    wait_for(lambda: port_bound(ns, "udp", port) or proc.poll() is not None, 60, f"own UDP server on {port}")
    assert proc.poll() is None, f"own UDP server on {port} failed: {proc.stderr.read()}"
    return proc


def set_elements(ns, name: str, table: str = TABLE) -> list:
    """The elements of one of the table's sets, as `nft -j` gives them ([] without the set)."""
    sets = [o["set"] for o in nft_json(ns, "list", "set", "inet", table, name) if "set" in o]
    return sets[0].get("elem", []) if sets else []


def bound_elements(ns, proto: str, version: int) -> set[tuple[str, int]]:
    """The kernel's bound_<proto>_v<version> set as (address or prefix, port) pairs."""
    sets = [o["set"] for o in nft_json(ns, "list", "set", "inet", TABLE, f"bound_{proto}_v{version}") if "set" in o]
    out = set()
    for elem in sets[0].get("elem", []) if sets else []:
        addr, port = elem["concat"]
        if isinstance(addr, dict):
            addr = f"{addr['prefix']['addr']}/{addr['prefix']['len']}"
        out.add((addr, port))
    return out


def wait_bound_set(ns, proto: str, port: int, present: bool = True, timeout: float = 10,
                   address: str = "0.0.0.0/0") -> None:
    """The worker refreshes the kernel's bound sets once a second."""
    version = 6 if ":" in address else 4
    wait_for(lambda: ((address, port) in bound_elements(ns, proto, version)) == present, timeout,
             f"{address} . {port} {'in' if present else 'out of'} the bound_{proto}_v{version} set")


# ---- client programs (script mode, run inside a namespace) -------------------------------

def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _endpoint(addr) -> list:
    return [addr[0], addr[1]]


def _odd_headers(sock: socket.socket, a) -> None:
    """What the packets of `sock` carry beyond the plain IP header: IPv4
    options, IPv6 hop-by-hop or destination options (each given in hex)."""
    for hexa, level, name in ((a.ipopts, socket.IPPROTO_IP, socket.IP_OPTIONS),
                              (a.hopopts, socket.IPPROTO_IPV6, socket.IPV6_HOPOPTS),
                              (a.dstopts, socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS)):
        if hexa:
            sock.setsockopt(level, name, bytes.fromhex(hexa))


def cmd_tcp(host: str, port: int, payload: str, timeout: float, a=None, sport: int = 0) -> dict:
    """One exchange; with --urgent N, byte N of the payload goes as TCP urgent data."""
    res: dict = {"ok": False}
    start = time.monotonic()
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if sport:
            sock.bind(("::" if _family(host) == socket.AF_INET6 else "0.0.0.0", sport))
        if a is not None:
            _odd_headers(sock, a)
        sock.connect((host, port))
        res["local"], res["peer"] = _endpoint(sock.getsockname()), _endpoint(sock.getpeername())
        data = payload.encode()
        if a is not None and a.urgent is not None:
            sock.sendall(data[:a.urgent])
            sock.send(data[a.urgent:a.urgent + 1], socket.MSG_OOB)
            data = data[a.urgent + 1:]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        res.update(ok=True, reply=data.decode(errors="replace"))
    except OSError as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    res["seconds"] = time.monotonic() - start
    return res


def cmd_hold(host: str, port: int, timeout: float) -> None:
    """One TCP conversation kept open: each line on stdin is sent, and what
    comes back is printed as one JSON line, until stdin ends."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        print(json.dumps({"ok": True, "local": _endpoint(sock.getsockname())}), flush=True)
        for line in sys.stdin:
            data = line.strip().encode()
            sock.sendall(data)
            got = b""
            while len(got) < len(data) and (chunk := sock.recv(65536)):
                got += chunk
            print(json.dumps({"sent": line.strip(), "reply": got.decode(errors="replace")}), flush=True)


def cmd_loop(host: str, first_port: int, give_up: int, timeout: float) -> None:
    """New TCP conversations, one after the other, to host:first_port, first_port + 1, ...: one
    JSON line each as it ends (`local`, `port`, `ok`), until `give_up` in a row went unanswered.
    Each from a port of its own (the destination's + 10000): a reused one would make the kernel
    end the earlier conversation's conntrack entry early (its reply tuple, to the listener, is the same)."""
    port, unanswered = first_port, 0
    while unanswered < give_up:
        res = cmd_tcp(host, port, f"loop {port}", timeout, sport=port + 10000)
        answered = res["ok"] and res.get("reply") == f"loop {port}"
        unanswered = 0 if answered else unanswered + 1
        print(json.dumps({"local": res.get("local"), "port": port, "ok": answered}), flush=True)
        port += 1


def cmd_until_reply(host: str, port: int, want: str, timeout: float) -> dict:
    """New TCP conversations to host:port, one every 20 ms, until one is
    answered with `want`: how long that took, and what came before."""
    start, seen = time.monotonic(), []
    while time.monotonic() - start < timeout:
        r = cmd_tcp(host, port, "probe", 0.5)
        if r.get("reply") == want:
            return {"ok": True, "seconds": time.monotonic() - start, "attempts": len(seen) + 1,
                    "before": sorted({x.get("reply", x.get("error", "")) for x in seen})}
        seen.append(r)
        time.sleep(0.02)
    return {"ok": False, "seconds": time.monotonic() - start, "attempts": len(seen), "last": seen[-1:]}


def cmd_udp(host: str, port: int, payload: str, timeout: float, resend: float = 0, a=None) -> dict:
    """One datagram and its answer; with `resend`, the datagram again every
    `resend` seconds until answered, as resolvers and other UDP clients do."""
    res: dict = {"ok": False}
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    start = time.monotonic()
    try:
        if a is not None:
            _odd_headers(sock, a)
            if a.broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        while True:
            sock.sendto(payload.encode(), (host, port))
            res["local"] = _endpoint(sock.getsockname())
            left = timeout - (time.monotonic() - start)
            sock.settimeout(max(0.001, min(left, resend) if resend else left))
            try:
                data, addr = sock.recvfrom(65536)
                break
            except TimeoutError:
                if time.monotonic() - start >= timeout:
                    raise
        res.update(ok=True, reply=data.decode(errors="replace"), source=_endpoint(addr))
    except OSError as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    res["seconds"] = time.monotonic() - start
    return res


def cmd_talk(steps: list[list], timeout: float) -> list[dict]:
    """Exchanges one after another: [["tcp" | "udp", host, port, payload], ...]."""
    return [{"step": step, **(cmd_tcp if step[0] == "tcp" else cmd_udp)(step[1], step[2], step[3], timeout)}
            for step in steps]


def _enough_files(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64) if hard != resource.RLIM_INFINITY
                                                    else n + 64, hard))


def cmd_many(targets: list[list], timeout: float) -> dict:
    """All connections open at once, then each sends its payload and reads it back."""
    import asyncio

    _enough_files(len(targets))

    async def connect(host, port):
        # The client port is connect()'s choice: with many open, Linux reuses
        # one port toward different destinations, as real clients do.
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)

    async def exchange(conn, payload: str):
        reader, writer = conn
        writer.write(payload.encode())
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(-1), timeout)
        peer = writer.get_extra_info("peername")
        writer.close()
        return data.decode(errors="replace"), _endpoint(peer)

    async def main() -> dict:
        t0 = time.monotonic()
        conns = await asyncio.gather(*(connect(h, p) for h, p, _ in targets), return_exceptions=True)
        t1 = time.monotonic()
        open_now = [c for c in conns if not isinstance(c, BaseException)]
        jobs = [exchange(c, t[2]) if not isinstance(c, BaseException) else None for c, t in zip(conns, targets)]
        results = await asyncio.gather(*(j for j in jobs if j is not None), return_exceptions=True)
        t2 = time.monotonic()
        it = iter(results)
        out, failures = 0, []
        for (host, port, payload), conn in zip(targets, conns):
            if isinstance(conn, BaseException):
                failures.append([host, port, f"connect: {type(conn).__name__}: {conn}"])
                continue
            r = next(it)
            if isinstance(r, BaseException):
                failures.append([host, port, f"exchange: {type(r).__name__}: {r}"])
            elif r[0] != payload:
                failures.append([host, port, f"got {r[0][:60]!r}"])
            elif r[1][1] != port or r[1][0] != host:
                failures.append([host, port, f"peer {r[1]}"])
            else:
                out += 1
        ports = [c[1].get_extra_info("sockname")[1] for c in conns if not isinstance(c, BaseException)]
        sockets = [[t[0], t[1], c[1].get_extra_info("sockname")[1]] for c, t in zip(conns, targets)
                   if not isinstance(c, BaseException)]
        return {"ok": out, "open_at_once": len(open_now), "failures": failures,
                "client_ports_shared": len(ports) - len(set(ports)), "sockets": sockets,
                "connect_seconds": t1 - t0, "seconds": t2 - t0}

    return asyncio.run(main())


def cmd_bulk(host: str, port: int, megabytes: float, timeout: float) -> dict:
    import hashlib
    import random
    import threading

    size = int(megabytes * 1024 * 1024)
    data = random.Random(port).randbytes(size)
    sent_hash = hashlib.sha256(data).hexdigest()
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    res: dict = {"ok": False, "bytes_sent": size, "sha256_sent": sent_hash}
    err: list[str] = []

    def send() -> None:
        try:
            view = memoryview(data)
            for off in range(0, size, 256 * 1024):
                sock.sendall(view[off:off + 256 * 1024])
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            err.append(f"send: {type(exc).__name__}: {exc}")

    start = time.monotonic()
    try:
        sock.connect((host, port))
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        h, got = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 20):
            h.update(chunk)
            got += len(chunk)
        sender.join(timeout)
        secs = time.monotonic() - start
        res.update(ok=not err, bytes_received=got, sha256_received=h.hexdigest(), seconds=secs,
                   mb_per_s=size / 1024 / 1024 / secs)
    except OSError as exc:
        err.append(f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()
    if err:
        res["error"] = "; ".join(err)
    return res


def cmd_fan_out(proto: str, targets: list[list], sport: int, timeout: float, one_by_one: bool) -> dict:
    """One client port (sport 0: the kernel's choice) towards many destinations.

    TCP: a socket per destination bound to that port, all open at once; each
    sends its payload, then each reads its echo. UDP: one socket sends to every
    destination (one by one, each waiting for its answer, or all at once) and
    reports where each answer came from."""
    res: list[dict] = [{"target": [h, p], "ok": False} for h, p, _ in targets]
    family = _family(targets[0][0])
    any_addr = "::" if family == socket.AF_INET6 else "0.0.0.0"
    _enough_files(len(targets))
    if proto == "udp":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        sock.bind((any_addr, sport))
        by_payload = {payload.encode(): r for r, (_, _, payload) in zip(res, targets)}

        def collect(until_payload: bytes | None) -> None:
            while True:
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:
                    return
                r = by_payload.get(data)
                if r is not None:
                    r.update(ok=True, source=_endpoint(addr))
                if until_payload is None and all(x["ok"] for x in res) or data == until_payload:
                    return

        for host, port, payload in targets:
            sock.sendto(payload.encode(), (host, port))
            if one_by_one:
                collect(payload.encode())
        if not one_by_one:
            collect(None)
        local = sock.getsockname()[1]
        sock.close()
        return {"local": local, "results": res}

    socks = []
    for r, (host, port, payload) in zip(res, targets):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(timeout)
        socks.append(sock)
        try:
            sock.bind((any_addr, sport))
            sock.connect((host, port))
            r["peer"] = _endpoint(sock.getpeername())
            sock.sendall(payload.encode())
        except OSError as exc:
            r["error"] = f"connect: {type(exc).__name__}: {exc}"
    for sock, r, (_, _, payload) in zip(socks, res, targets):
        if "error" not in r:
            try:
                sock.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                r.update(ok=data == payload.encode(), reply=data.decode(errors="replace")[:80],
                         retransmits=_total_retrans(sock))
            except OSError as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"
        sock.close()
    return {"local": sport, "results": res}


def _total_retrans(sock: socket.socket) -> int:
    """The segments this connection sent again (SYNs included): struct
    tcp_info's tcpi_total_retrans, at byte 100."""
    import struct

    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 100)[0]


def _syn_retransmits() -> int:
    """This network namespace's TCPSynRetrans: the SYNs its sockets sent again.
    (tcpi_total_retrans counts every segment, tail loss probes too, which a
    loaded machine makes of a stalled ACK.)"""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return int(dict(zip(head.split()[1:], values.split()[1:]))["TCPSynRetrans"])
    raise RuntimeError("no TcpExt in /proc/net/netstat")


def cmd_from_ports(targets: list[list], half_close: bool, timeout: float) -> dict:
    """One TCP exchange per [sport, host, port, payload], one after another,
    each from its own fixed client port (SO_REUSEADDR, as a client reusing its
    ports does). Without --half-close the server is left to close first (an
    HTTP request); with it, the client half-closes after sending (the echo).
    Each reports how many times its SYN was sent again (`syn_retransmits`: 0
    if it was answered at once; the client's namespace has no other traffic)
    and how many segments in all (`retransmits`)."""
    res = []
    for sport, host, port, payload in targets:
        r: dict = {"sport": sport, "target": [host, port], "ok": False}
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(timeout)
        try:
            sock.bind(("::" if _family(host) == socket.AF_INET6 else "0.0.0.0", sport))
            syns = _syn_retransmits()
            sock.connect((host, port))
            r["syn_retransmits"] = _syn_retransmits() - syns
            sock.sendall(payload.encode())
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            r.update(ok=True, reply=data.decode(errors="replace")[:80], retransmits=_total_retrans(sock))
        except OSError as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            sock.close()
        res.append(r)
    return {"results": res}


def _sum16(data: bytes) -> int:
    return sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))


def cmd_synflood(src: str, net: str, count: int, seconds: float) -> dict:
    """`count` TCP SYNs from `src` (this host's own address) to addresses of
    `net` and ports 1-65535, from a raw socket: nobody waits for an answer,
    as in a flood. Paced to take at least `seconds`."""
    import ipaddress
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    base = ipaddress.ip_network(net)
    saddr = ipaddress.ip_address(src).packed
    # The checksum's fixed part: source address, protocol, length, header fields.
    fixed = _sum16(saddr) + socket.IPPROTO_TCP + 20 + 0x5002 + 65535
    start, sent = time.monotonic(), 0
    for i in range(count):
        daddr = base[1 + i % (base.num_addresses - 2)].packed
        sport, dport = 1024 + i % 64000, 1 + (i * 7919) % 65535  # as hping3 does: a port per SYN
        total = fixed + _sum16(daddr) + sport + dport + (i >> 16) + (i & 0xFFFF)
        while total > 0xFFFF:
            total = (total & 0xFFFF) + (total >> 16)
        seg = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 0x50, 0x02, 65535, ~total & 0xFFFF, 0)
        try:
            sock.sendto(seg, (socket.inet_ntoa(daddr), 0))
            sent += 1
        except OSError:
            pass  # a full transmit queue: a flood does not care
        if i % 1000 == 999:
            ahead = (i + 1) * seconds / count - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    return {"sent": sent, "seconds": time.monotonic() - start}


def _checksum(data: bytes) -> int:
    total = _sum16(data + b"\0" * (len(data) % 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _spoofed_packet(src: str, dst: str, proto: str, port: int, payload: bytes, ttl: int = 64) -> bytes:
    """One IPv4 or IPv6 packet from `src` (any address) to `dst`: an ICMP echo
    request, a TCP SYN or a UDP datagram carrying `payload`."""
    import ipaddress
    import struct

    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    v6 = s.version == 6
    number = {"icmp": 58 if v6 else 1, "tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}[proto]
    if proto == "icmp":
        body = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0x4E44, 1) + payload
    elif proto == "tcp":
        body = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 0x50, 0x02, 65535, 0, 0) + payload
    else:
        body = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
    if v6:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(body), number)
    else:
        pseudo = s.packed + d.packed + struct.pack("!xBH", number, len(body))
    csum = _checksum((b"" if proto == "icmp" and not v6 else pseudo) + body)
    at = {"icmp": 2, "tcp": 16, "udp": 6}[proto]
    body = body[:at] + struct.pack("!H", csum) + body[at + 2:]
    if v6:
        return struct.pack("!IHBB", 6 << 28, len(body), number, ttl) + s.packed + d.packed + body
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(body), 0, 0, ttl, number, 0) + s.packed + d.packed
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + body


def cmd_spoof(packets: list, device: str | None) -> dict:
    """Each [src, dst, proto, port, payload(, ttl)] sent once from a raw socket that
    writes the IP header itself, so with a source this host does not own.
    With `device`, to the link's broadcast or multicast (ff02::1) address out
    of that interface, as the link layer: only there may the source be
    0.0.0.0 or :: (IP_HDRINCL would fill it in)."""
    sent = 0
    for src, dst, proto, port, payload, *ttl in packets:
        packet = _spoofed_packet(src, dst, proto, port, payload.encode(), *ttl)
        if device:
            v6 = _family(dst) == socket.AF_INET6
            ethertype, mac = (0x86DD, "333300000001") if v6 else (0x0800, "ffffffffffff")
            with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ethertype)) as sock:
                sock.sendto(packet, (device, ethertype, 0, 0, bytes.fromhex(mac)))
        else:
            with socket.socket(_family(dst), socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:  # header included
                sock.sendto(packet, (dst, 0))
        sent += 1
    return {"sent": sent}


def cmd_recv_udp(port: int, count: int, timeout: float) -> dict:
    """The sources of the first `count` datagrams to `port` (any address, both families)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.settimeout(timeout)
    sources = []
    try:
        while len(sources) < count:
            _data, peer = sock.recvfrom(65536)
            sources.append(peer[0].removeprefix("::ffff:"))
    except OSError:
        pass
    return {"sources": sources}


def cmd_udpscan(host: str, count: int, seconds: float) -> dict:
    """One UDP socket sends `count` datagrams to ports 1, 2, ... of `host`
    (a port scan), paced to take at least `seconds`; counts the answers."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    sock.setblocking(False)
    start, answers = time.monotonic(), 0
    for i in range(count):
        try:
            sock.sendto(b"scan", (host, 1 + i % 65535))
        except OSError:
            pass
        while True:
            try:
                sock.recv(64)
                answers += 1
            except OSError:
                break
        if i % 500 == 499:
            ahead = (i + 1) * seconds / count - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    return {"sent": count, "answers": answers, "seconds": time.monotonic() - start}


def cmd_udpblast(host: str, count: int, size: int, first: int, ports: int, seconds: float) -> dict:
    """`count` datagrams of `size` bytes from one socket to ports first,
    first + 1, ... (`ports` of them, then again), paced to take at least
    `seconds`; nobody waits for an answer."""
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    start, sent, data = time.monotonic(), 0, b"B" * size
    for i in range(count):
        try:
            sock.sendto(data, (host, first + i % ports))
            sent += 1
        except OSError:
            pass
        if i % 20 == 19:  # a burst of fragments at most the size of a device's backlog
            ahead = (i + 1) * seconds / count - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    return {"sent": sent, "seconds": time.monotonic() - start}


def _setns(path: str) -> None:
    # Not nftdivert.process.namespaces: this file also runs alone, as the client, with the standard library only.
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _race_round(proto: str, server_netns: str, host: str, port: int, delay: float, bind: str) -> dict:
    """Bind a service on bind:port in the server's namespace ("::": every address),
    and `delay` seconds later send to host:port from here: who answered, the
    service (own-PORT) or nftdivert's default listener (the echo)?"""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/run/netns/{server_netns}")
        srv = socket.socket(_family(bind), kind)
    finally:
        _setns(f"/proc/self/fd/{here}")
        os.close(here)
    cli = socket.socket(_family(host), kind)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind == "::":
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind((bind, port))
        if proto == "tcp":
            srv.listen(8)
        time.sleep(delay)
        payload = f"race-{port}".encode()
        if proto == "tcp":
            cli.settimeout(5)
            cli.connect((host, port))
            cli.sendall(payload)
            cli.shutdown(socket.SHUT_WR)
        else:
            cli.sendto(payload, (host, port))
        local = cli.getsockname()[1]
        deadline = time.monotonic() + 5
        while True:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([srv, cli], [], [], max(0, left))
            if not readable:
                return {"ok": False, "port": port, "local": local, "error": "no answer"}
            if cli in readable:
                reply = cli.recv(65536) if proto == "udp" else _read_all(cli)
                return {"ok": True, "port": port, "local": local, "reply": reply.decode()}
            if proto == "tcp":
                conn, _ = srv.accept()
                with conn:
                    _read_all(conn)
                    conn.sendall(f"own-{port}".encode())
            else:
                _data, peer = srv.recvfrom(65536)
                srv.sendto(f"own-{port}".encode(), peer)
    except OSError as exc:
        return {"ok": False, "port": port, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        cli.close()
        srv.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def cmd_bind_race(proto: str, server_netns: str, host: str, ports: list[int], delays: list[float],
                  binds: list[str]) -> dict:
    """Rounds of _race_round, one per port, each with its own delay and address."""
    rounds = [_race_round(proto, server_netns, host, *r) for r in zip(ports, delays, binds)]
    return {"ok": all(r["ok"] for r in rounds), "rounds": rounds}


def cmd_serve_tcp(port: int, reply: str, bind: str) -> None:
    srv = socket.socket(_family(bind), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if bind == "::":
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((bind, port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        try:
            conn.settimeout(3)
            while conn.recv(65536):  # read the request to its end: no RST on close
                pass
            conn.sendall(reply.encode())
        except OSError:
            pass
        finally:
            conn.close()


def cmd_serve_udp(port: int, reply: str, bind: str) -> None:
    srv = socket.socket(_family(bind), socket.SOCK_DGRAM)
    if bind == "::":
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind((bind, port))
    while True:
        _data, peer = srv.recvfrom(65536)
        srv.sendto(reply.encode(), peer)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="harness.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("tcp", "udp"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("payload")
        p.add_argument("--timeout", type=float, default=3)
        for opt in ("--ipopts", "--hopopts", "--dstopts"):
            p.add_argument(opt, help="hex bytes: IPv4 options, IPv6 hop-by-hop or destination options header")
        if name == "udp":
            p.add_argument("--resend", type=float, default=0)
            p.add_argument("--broadcast", action="store_true")
        else:
            p.add_argument("--urgent", type=int, help="send byte N of the payload as urgent data")
    p = sub.add_parser("many")
    p.add_argument("--json", required=True, help="[[host, port, payload], ...]")
    p.add_argument("--timeout", type=float, default=20)
    p = sub.add_parser("talk")
    p.add_argument("--json", required=True, help='[["tcp" | "udp", host, port, payload], ...]')
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("bulk")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("megabytes", type=float)
    p.add_argument("--timeout", type=float, default=60)
    p = sub.add_parser("fan-out")
    p.add_argument("proto", choices=("tcp", "udp"))
    p.add_argument("--json", required=True, help="[[host, port, payload], ...]")
    p.add_argument("--sport", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5)
    p.add_argument("--one-by-one", action="store_true")
    p = sub.add_parser("from-ports")
    p.add_argument("--json", required=True, help="[[sport, host, port, payload], ...]")
    p.add_argument("--half-close", action="store_true")
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("hold")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=5)
    p = sub.add_parser("loop")
    p.add_argument("host")
    p.add_argument("first_port", type=int)
    p.add_argument("--give-up", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1)
    p = sub.add_parser("until-reply")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("want")
    p.add_argument("--timeout", type=float, default=10)
    p = sub.add_parser("synflood")
    p.add_argument("src")
    p.add_argument("net")
    p.add_argument("count", type=int)
    p.add_argument("--seconds", type=float, default=0)
    p = sub.add_parser("udpblast")
    p.add_argument("host")
    for name in ("count", "size", "first", "ports"):
        p.add_argument(name, type=int)
    p.add_argument("--seconds", type=float, default=0)
    p = sub.add_parser("spoof")
    p.add_argument("--json", required=True, help="[[src, dst, icmp|tcp|udp, port, payload(, ttl)], ...]")
    p.add_argument("--device")
    p = sub.add_parser("recv-udp")
    p.add_argument("port", type=int)
    p.add_argument("count", type=int)
    p.add_argument("--timeout", type=float, default=10)
    p = sub.add_parser("udpscan")
    p.add_argument("host")
    p.add_argument("count", type=int)
    p.add_argument("--seconds", type=float, default=0)
    p = sub.add_parser("bind-race")
    p.add_argument("proto", choices=("tcp", "udp"))
    p.add_argument("server_netns")
    p.add_argument("host")
    p.add_argument("--json", required=True, help='{"ports": [...], "delays": [...]}')
    for name in ("serve-tcp", "serve-udp"):
        p = sub.add_parser(name)
        p.add_argument("port", type=int)
        p.add_argument("reply")
        p.add_argument("--bind", default="::")
    a = ap.parse_args(argv)
    if a.cmd == "tcp":
        out = cmd_tcp(a.host, a.port, a.payload, a.timeout, a)
    elif a.cmd == "udp":
        out = cmd_udp(a.host, a.port, a.payload, a.timeout, a.resend, a)
    elif a.cmd == "many":
        out = cmd_many(json.loads(a.json), a.timeout)
    elif a.cmd == "talk":
        out = cmd_talk(json.loads(a.json), a.timeout)
    elif a.cmd == "bulk":
        out = cmd_bulk(a.host, a.port, a.megabytes, a.timeout)
    elif a.cmd == "fan-out":
        out = cmd_fan_out(a.proto, json.loads(a.json), a.sport, a.timeout, a.one_by_one)
    elif a.cmd == "from-ports":
        out = cmd_from_ports(json.loads(a.json), a.half_close, a.timeout)
    elif a.cmd == "hold":
        cmd_hold(a.host, a.port, a.timeout)
        return
    elif a.cmd == "loop":
        cmd_loop(a.host, a.first_port, a.give_up, a.timeout)
        return
    elif a.cmd == "until-reply":
        out = cmd_until_reply(a.host, a.port, a.want, a.timeout)
    elif a.cmd == "synflood":
        out = cmd_synflood(a.src, a.net, a.count, a.seconds)
    elif a.cmd == "udpblast":
        out = cmd_udpblast(a.host, a.count, a.size, a.first, a.ports, a.seconds)
    elif a.cmd == "spoof":
        out = cmd_spoof(json.loads(a.json), a.device)
    elif a.cmd == "recv-udp":
        out = cmd_recv_udp(a.port, a.count, a.timeout)
    elif a.cmd == "bind-race":
        out = cmd_bind_race(a.proto, a.server_netns, a.host, **json.loads(a.json))
    elif a.cmd == "udpscan":
        out = cmd_udpscan(a.host, a.count, a.seconds)
    else:
        (cmd_serve_tcp if a.cmd == "serve-tcp" else cmd_serve_udp)(a.port, a.reply, a.bind)
        return
    print(json.dumps(out))


if __name__ == "__main__":
    main()
