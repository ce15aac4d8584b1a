"""`nftdivert sandbox -- CMD`: one program with all of its traffic answered locally.

Two network namespaces joined by a veth pair and routed nowhere else: CMD
runs in the client one as the invoking user; nftdivert runs in the diverter
one, which is the client's gateway and DNS server. Nothing can leak: there
is no path out.

Lifetime: the sandbox lasts until every process CMD started has exited
(pidns.py keeps them together), until --timeout, or until Ctrl-C or SIGTERM.
Then both namespaces, with their tables and processes, are gone. After a
SIGKILL its children die with it (lifeline.py), and the next sandbox removes
the namespaces it left, once its lock file proves that nothing of it runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace

from nftdivert import runner, stats
from nftdivert.lab import netns
from nftdivert.config import Config, Listener
from nftdivert.errors import NftDivertError, say as _say
from nftdivert.process import lockfile
from nftdivert.process.child import READY, wait_ready
from nftdivert.process.lifeline import fork_child
from nftdivert.lab.pidns import Tree
from nftdivert.stats import STATS_DIR

# One lock file per sandbox, held by it and its children for as long as any
# of them lives; the kernel lets go of it when the last one dies, SIGKILL or not.
LOCKS = STATS_DIR / "sandbox"
_LAB_NAME = re.compile(r"(nds\d+)-(?:client|divert)")

# The link between the two namespaces. Link-local and ULA addresses: they
# exist only on that veth and route nowhere.
DIVERTER_V4, CLIENT_V4, PREFIX_V4 = "169.254.53.1", "169.254.53.2", 30
DIVERTER_V6, CLIENT_V6, PREFIX_V6 = "fd6e:6476::1", "fd6e:6476::2", 64
DIVERTER_IF, CLIENT_IF = "nd-divert", "nd-client"

DNS_LISTENERS = (Listener(name="dns", protocol="udp", port=53, kind="dns"),
                 Listener(name="dns-tcp", protocol="tcp", port=53, kind="dns"))

TIMED_OUT = 124  # like timeout(1)
READY_SECONDS = 30.0  # for the diverter to divert
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL when the sandbox ends the tree
REPORT_AT_MOST = 2.0  # seconds between two reports of what still runs, when it changes
REPORT_EVERY = 15.0  # ... and when it does not


@dataclass(frozen=True)
class Lab:
    client: str
    diverter: str

    @classmethod
    def named(cls, base: str) -> "Lab":
        return cls(client=f"{base}-client", diverter=f"{base}-divert")


# Where the sandbox's own defaults differ from `run`'s (a config file's
# values win). Admission protects the other clients from one client's flood;
# a sandbox has one client, so per-source limits would protect nobody, and
# only cost a fast scan the conversations they drop.
CONFIG_DEFAULTS = {"queue": {"new_tcp_per_source": 0, "new_udp_per_source": 0}}


def sandbox_config(config: Config) -> Config:
    """The config with what a sandbox needs: gateway on its link, a DNS listener.

    Its namespaces go when it ends, containment with them: nothing to keep after a stop.
    """
    taken = {(lst.protocol, lst.port) for lst in config.listeners}
    extra = tuple(lst for lst in DNS_LISTENERS if (lst.protocol, lst.port) not in taken
                  and lst.name not in {x.name for x in config.listeners})
    return replace(config, mode="gateway", interfaces=(DIVERTER_IF,), listeners=config.listeners + extra,
                   containment_after_stop="remove")


def create(name: str, ipv6: bool) -> Lab:
    lab = Lab.named(name)
    client = netns.Netns.add(lab.client)
    try:
        diverter = netns.Netns.add(lab.diverter)
        # veth() skips duplicate address detection: on a link of two no address is ever tentative.
        netns.veth(client, CLIENT_IF, [f"{CLIENT_V4}/{PREFIX_V4}"] + ([f"{CLIENT_V6}/{PREFIX_V6}"] if ipv6 else []),
                   diverter, DIVERTER_IF, [f"{DIVERTER_V4}/{PREFIX_V4}"] + ([f"{DIVERTER_V6}/{PREFIX_V6}"] if ipv6 else []))
        client.run("ip", "route", "add", "default", "via", DIVERTER_V4)
        if ipv6:
            client.run("ip", "-6", "route", "add", "default", "via", DIVERTER_V6)
        resolv = netns.ETC_NETNS / lab.client / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_text(f"nameserver {DIVERTER_V4}\n")  # nothing more: CMD may read it
        _wait_link(lab, ipv6)
    except BaseException:
        destroy(lab)
        raise
    return lab


def _wait_link(lab: Lab, ipv6: bool, timeout: float = 5.0) -> None:
    """Until both ends of the veth carry packets.

    The kernel brings a link up in two steps: the second one (when it sees
    the carrier) attaches the queueing discipline and starts IPv6 on it.
    Before that, packets are dropped: the first connection would wait for a
    retransmission, a second later. The link-local address appears in that
    second step, so it is the sign; on the other end it is there at once.
    """
    deadline = time.monotonic() + timeout
    for ns, ifname in ((lab.client, CLIENT_IF), (lab.diverter, DIVERTER_IF)):
        while not _link_ready(ns, ifname, ipv6) and time.monotonic() < deadline:
            time.sleep(0.01)  # not ready in time only costs that one second


def _link_ready(ns: str, ifname: str, ipv6: bool) -> bool:
    link = json.loads(netns.Netns(ns).run("ip", "-j", "addr", "show", "dev", ifname).stdout)[0]
    v6 = [a for a in link.get("addr_info", []) if a.get("family") == "inet6"]
    return link.get("operstate") == "UP" and (not ipv6 or (
        any(a["local"].startswith("fe80:") for a in v6) and not any(a.get("tentative") for a in v6)))


def destroy(lab: Lab) -> None:
    """Kill what runs inside, delete both namespaces and the resolv.conf; never raises."""
    for ns in (lab.client, lab.diverter):
        netns.Netns(ns).delete()


# ---- what a killed sandbox left behind -------------------------------------------

def _lock(base: str) -> int:
    """This sandbox's lock file, held; an fd every forked child shares (and no exec'd program)."""
    try:
        LOCKS.mkdir(parents=True, exist_ok=True)
        fd = lockfile.acquire(LOCKS / f"{base}.lock")
    except OSError as exc:
        raise NftDivertError(f"cannot make the sandbox's lock file in {LOCKS}: {exc.strerror}") from None
    if fd is None:
        raise NftDivertError(f"a sandbox named {base} is running already (in another PID namespace?)")
    return fd


def remove_stale() -> list[str]:
    """Remove what killed sandboxes left behind; returns what went.

    Only what is provably dead goes: the namespaces and resolv.conf of a
    sandbox whose lock file nobody holds any more, and a resolv.conf
    directory whose namespace is gone (a reboot empties /run, and so the
    locks, but not /etc). Namespaces without a lock file (an older
    nftdivert's) are left alone.
    """
    bases = set()
    for folder in (netns.NETNS_DIR, netns.ETC_NETNS):
        try:
            bases.update(m[1] for name in os.listdir(folder) if (m := _LAB_NAME.fullmatch(name)))
        except FileNotFoundError:
            pass
    removed = []
    for base in sorted(bases):
        lab, lock = Lab.named(base), LOCKS / f"{base}.lock"
        if not lock.exists():
            resolv = netns.ETC_NETNS / lab.client
            if resolv.is_dir() and not any((netns.NETNS_DIR / ns).exists() for ns in (lab.client, lab.diverter)):
                shutil.rmtree(resolv, ignore_errors=True)
                removed.append(str(resolv))
            continue
        try:
            fd = lockfile.acquire(lock, create=False)
        except OSError:
            continue
        if fd is None:
            continue  # alive, or it has just cleaned up after itself
        _remove_stats(lab)
        destroy(lab)
        lockfile.release(lock, fd)
        removed.append(base)
    return removed


def _remove_stats(lab: Lab) -> None:
    """The counters file, the ownership lock and the analyses' control socket the diverter kept
    (stats.stats_path, owner.lock_path, analyses.control_path), named by its namespace."""
    try:
        ino = os.stat(netns.NETNS_DIR / lab.diverter).st_ino
    except OSError:
        return
    for path in [*STATS_DIR.glob(f"*-{ino}.json"), *STATS_DIR.glob(f"*-{ino}.lock"), *STATS_DIR.glob(f"*-{ino}.tasks")]:
        path.unlink(missing_ok=True)


# ---- the diverter -------------------------------------------------------------------

def _start_diverter(lab: Lab, config: Config, pcap: str | None, summary: str | None) -> int:
    """Fork nftdivert into the diverter namespace; returns its pid once it diverts."""
    ready_r, ready_w = multiprocessing.Pipe(duplex=False)

    def diverter() -> int:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)  # not the parent's handlers; runner sets its own
            ready_r.close()
            os.setpgid(0, 0)  # the terminal's Ctrl-C is for CMD, not for the diverter
            netns.Netns(lab.diverter).enter()
            final = runner.run(config, pcap_path=pcap, on_ready=lambda: ready_w.send(READY),
                               summary_path=summary, clients_netns=str(netns.NETNS_DIR / lab.client))
            if final:
                print(f"nftdivert: {stats.summary(final)}", file=sys.stderr, flush=True)
            return 0
        except BaseException as exc:  # noqa: BLE001 - report, then leave the child
            print(f"nftdivert: diverter failed: {exc}", file=sys.stderr, flush=True)
            return 1

    pid = fork_child(diverter)
    ready_w.close()
    up = False
    try:
        wait_ready("the diverter", ready_r, pid, READY_SECONDS)
        up = True
    except OSError as exc:
        raise NftDivertError(f"{exc} (see its messages above)") from None
    finally:
        ready_r.close()
        if not up:  # failed, or a Ctrl-C while it started: run() has no pid to stop
            _stop_diverter(pid)
    return pid


def _stop_diverter(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# ---- CMD ----------------------------------------------------------------------------

def _invoking_user() -> tuple[int, int]:
    """Who CMD runs as: the user behind sudo, else whoever we are."""
    if os.geteuid() == 0 and os.environ.get("SUDO_UID", "").isdigit():
        return int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", os.environ["SUDO_UID"]))
    return os.getuid(), os.getgid()


def _cmd_argv(lab: Lab, command: list[str]) -> list[str]:
    uid, gid = _invoking_user()
    argv = command or [os.environ.get("SHELL", "/bin/sh")]
    if uid != 0:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]
    return ["ip", "netns", "exec", lab.client, *argv]


def _trust(lab: Lab, config: Config) -> dict[str, str]:
    """CMD trusts the CA of the TLS answers: its /etc/ssl bundle and the variables naming one."""
    from nftdivert.lab import trust
    from nftdivert.services import certs  # cryptography: loaded only here

    return trust.install(netns.ETC_NETNS / lab.client, certs.ensure_ca(config.tls.state_dir).pem)


def _show(running: list[tuple[int, str]]) -> None:
    for pid, cmdline in running:
        _say(f"  pid {pid}: {cmdline[:120]}")


def _watch(tree: Tree, timeout: float | None) -> int:
    """Until the tree is empty (CMD's status) or `timeout` seconds (TIMED_OUT)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown: list | None = None
    exited_at = shown_at = 0.0
    while True:
        left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if tree.wait(max(left, 0)):
            return tree.cmd_status
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            _say(f"--timeout {timeout:g} s reached: ending the sandbox")
            _show(tree.members())
            return TIMED_OUT
        if tree.cmd_status is None:
            continue
        exited_at = exited_at or now  # what is about to exit gets a moment first
        if now - exited_at < 0.5 or now - shown_at < REPORT_AT_MOST:
            continue
        running = tree.members()
        if not running or (running == shown and now - shown_at < REPORT_EVERY):
            continue
        if shown is None:
            _say(f"CMD exited with status {tree.cmd_status}; the sandbox waits for what it started "
                 "(Ctrl-C ends it now):")
        else:
            _say("still running:")
        _show(running)
        shown, shown_at = running, now


class _Interrupted(Exception):
    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


def _interrupt(signo, _frame) -> None:
    raise _Interrupted(signo)  # unwinds run(): the finally clause cleans up


def run(config: Config, command: list[str], *, pcap: str | None = None, timeout: float | None = None,
        summary: str | None = None) -> int:
    """Run `command` in a fresh sandbox until its whole tree has exited.

    Returns CMD's exit status (128+N for signal N), TIMED_OUT after `timeout`
    seconds, or 128+N when signal N (SIGINT, SIGTERM) ended the sandbox.
    """
    if os.geteuid() != 0:
        raise NftDivertError("the sandbox makes network namespaces: run it as root (sudo keeps you as CMD's user)")
    config = sandbox_config(config)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    base = f"nds{os.getpid()}"
    lock = lab = tree = None
    pid = 0
    try:
        removed = remove_stale()
        if removed:
            _say(f"removed what killed sandboxes left behind: {', '.join(removed)}")
        lock = _lock(base)
        lab = create(base, config.ipv6)
        trusted = _trust(lab, config)
        pid = _start_diverter(lab, config, pcap, summary)
        if not command:
            _say("sandbox shell; every address and name answers locally. exit to leave.")
        try:
            # CMD's environment is ours, with nothing added that names nftdivert: CMD may read it.
            tree = Tree(_cmd_argv(lab, command), {**os.environ, **trusted})
        except OSError as exc:
            raise NftDivertError(f"cannot give CMD a PID namespace of its own: {exc}") from None
        return _watch(tree, timeout)
    except _Interrupted as exc:
        _say(f"{signal.Signals(exc.signo).name}: ending the sandbox")
        if tree is not None:
            _show(tree.members())
        return 128 + exc.signo
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        if tree is not None:
            tree.end(KILL_GRACE)
            tree.close()
        if pid:
            _stop_diverter(pid)
        if lab is not None:
            destroy(lab)
        if lock is not None:
            lockfile.release(LOCKS / f"{base}.lock", lock)
        for s, handler in previous.items():
            signal.signal(s, handler)
