"""nftdivert.lab.netns on the real kernel: made, linked, entered, and always removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from nftdivert.lab import netns


def test_names_are_unique_and_carry_the_makers_pid():
    a, b = netns.unique_name("ndt-x"), netns.unique_name("ndt-x")
    assert a != b
    assert a.startswith(f"ndt-x-{os.getpid()}-")


def _started(ns: netns.Netns, script: str) -> int:
    """A process inside `ns` that nobody tracks: its shell parent has already exited."""
    return int(ns.sh(f"{script} >/dev/null 2>&1 & echo $!").stdout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.kernel
def test_delete_stops_every_process_inside_and_none_outside(make_netns):
    ns = make_netns("del")
    tracked = ns.popen("sleep", "300")
    untracked = _started(ns, "sleep 300")
    outside = subprocess.Popen(["sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while tracked.pid not in ns.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(ns.pids()) == sorted([tracked.pid, untracked])
        ns.delete()
        assert not ns.exists()
        assert tracked.returncode is not None
        assert not _alive(untracked)
        assert outside.poll() is None, "a process outside the namespace was hit"
        ns.delete()  # again: nothing to do, and no error
    finally:
        outside.kill()
        outside.wait()


@pytest.mark.kernel
@pytest.mark.parametrize("grace, said_goodbye", [(5.0, True), (0.0, False)])
def test_grace_lets_processes_clean_up_first(make_netns, tmp_path, grace, said_goodbye):
    ns = make_netns("grace")
    mark = tmp_path / "bye"
    ready = tmp_path / "ready"
    _started(ns, f"sh -c 'trap \"echo bye > {mark}; exit 0\" TERM; touch {ready}; "
                 f"while :; do sleep 0.05; done'")
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    ns.delete(grace=grace)
    assert not ns.exists()
    assert mark.exists() == said_goodbye


@pytest.mark.kernel
def test_veth_links_two_namespaces_at_once_without_a_name_in_the_hosts(make_netns):
    a, b = make_netns("va"), make_netns("vb")
    ifname = f"ndt{os.getpid() % 100000}"
    netns.veth(a, ifname, ["192.0.2.1/24", "2001:db8:7::1/64"], b, "eth0", ["192.0.2.2/24", "2001:db8:7::2/64"])
    a.run("ping", "-c1", "-W5", "192.0.2.2", timeout=10)
    a.run("ping", "-6", "-c1", "-W5", "2001:db8:7::2", timeout=10)
    for ns, dev in ((a, ifname), (b, "eth0")):
        assert "tentative" not in ns.run("ip", "-6", "addr", "show", "dev", dev).stdout
    assert subprocess.run(["ip", "link", "show", ifname], capture_output=True).returncode != 0


@pytest.mark.kernel
def test_a_forked_child_enters_the_namespace(make_netns):
    ns = make_netns("enter")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ns.enter()
            os.write(w, str(os.stat("/proc/self/ns/net").st_ino).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 64)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert int(got) == os.stat(netns.NETNS_DIR / ns.name).st_ino


@pytest.mark.kernel
def test_a_killed_makers_namespaces_are_stale_and_others_are_not(make_netns):
    """Made by a process that was SIGKILLed: removed with what runs inside.
    Made by a living process (this one): left alone."""
    prefix = f"ndt-stale{os.getpid()}"
    maker = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom nftdivert.lab import netns\n"
         f"ns = netns.Netns.create({prefix!r})\nns.popen('sleep', '300')\n"
         "print(ns.name, flush=True)\ntime.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        stale = maker.stdout.readline().strip()
    finally:
        maker.kill()
        maker.wait()
        maker.stdout.close()
    orphan = netns.Netns(stale)
    try:
        assert stale and orphan.exists()
        live = netns.Netns.create(prefix)
        try:
            deadline = time.monotonic() + 10
            while not (inside := orphan.pids()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert inside, "the stale namespace should still hold the maker's sleep"
            assert netns.owners(prefix) == {stale: maker.pid, live.name: os.getpid()}
            assert netns.remove_stale(prefix) == [stale]
            assert not orphan.exists()
            assert not any(_alive(pid) for pid in inside)
            assert live.exists()
        finally:
            live.delete()
    finally:
        orphan.delete()
