"""Shared fixtures: root check, test hosts as network namespaces, the CLI.

Session start: a preflight names every program the suite needs that is
missing (tests/programs.py), with its Debian package, and stops the run.

Markers: `kernel` (root and a real kernel), `slow`, `load`, `vm` and
`any_backend`. The VM tier (`make test-kernel`) runs `-m vm`: what needs a
stock kernel with the native nft queue, and nothing else, because under
emulation every test costs ten to sixty times what it costs here. The rule:
every test in an end-to-end module (tests/e2e/test_e2e*.py) is `vm` unless it
is marked `load` or `slow` (under emulation a load test only stresses qemu) or
`any_backend` (what it proves is the same code on both queue backends: the
worker's logic, ownership, containment, DNS; the host covers it). Other tests
join by a `vm` mark of their own (the kernel's read-back of native rulesets).
So a new end-to-end test runs in the VM unless it says why not.

Divert path: the end-to-end suites run on the queue path, and `make test`
runs them again on the kernel path (NFTDIVERT_TEST_PATH=kernel). A test of
what only one path does is marked `queue_path` or `kernel_path`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns as netns_mod  # noqa: E402
import programs  # noqa: E402
import unprivileged  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

MARKERS = {
    "queue_path": "proves what only the queue path does (the worker, its queues): skipped on the kernel path",
    "kernel_path": "proves what only the kernel path does: skipped on the queue path",
    "vm": "needs a stock kernel's native nft queue: runs in the VM tier (make test-kernel)",
    "any_backend": "end to end, but the same code on both queue backends: the host tier covers it, not the VM",
    "load": "an end-to-end load test: stays on the host, out of the VM tier",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_sessionstart(session):
    absent = programs.missing()
    if absent:
        raise pytest.UsageError(programs.preflight_message(absent))


def pytest_collection_modifyitems(config, items):
    import harness

    for item in items:
        if item.path.name.startswith("test_e2e") and not {"load", "slow", "any_backend"} & set(item.keywords):
            item.add_marker(pytest.mark.vm)
        other = "queue_path" if harness.KERNEL_PATH else "kernel_path"
        if item.get_closest_marker(other):  # a marker, not a keyword: a parameter id may be "kernel_path"
            item.add_marker(pytest.mark.skip(reason=f"{other.replace('_', ' ')} only; "
                                                    f"this run is on the {harness.DIVERT_PATH} path"))
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces and nftables")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


RULESET_TESTS = Path(__file__).resolve().parent / "ruleset"


@pytest.fixture(autouse=True)
def _ruleset_tests_on_one_cpu(request):
    """The ruleset tests run as on a host of one CPU. queue.workers = 0 (the default) means one
    queue worker per CPU the run may use, and the ruleset has chains per worker: a golden
    rendering must not depend on the machine that checks it (the CLI's renderings inherit
    the affinity). Several workers are rendered from configs that say how many."""
    if RULESET_TESTS not in Path(request.node.path).parents:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.fixture
def make_netns():
    """Factory for test hosts; every namespace it made is removed, pass or fail."""
    made: list[netns_mod.Netns] = []

    def make(role: str) -> netns_mod.Netns:
        ns = netns_mod.create(role)
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(made):
            ns.delete()


@pytest.fixture
def host(make_netns):
    """One fresh namespace: a kernel with an empty ruleset to apply into."""
    return make_netns("host")


@pytest.fixture(scope="session")
def _gateway_lab(tmp_path_factory):
    """One end-to-end lab (client, diverter, internet) for the whole run:
    building one, and starting a diverter in it, costs seconds here and half
    a minute under emulation (the VM tier). A diverter a module leaves running
    serves the next one if the config is the same; a test that needs another
    config stops it cleanly first (GatewayLab.ensure). At the end: nftdivert
    stopped cleanly (`remove` leaves nothing), and the internet host's
    capture worked and saw nothing from the client."""
    import harness

    g = harness.GatewayLab(netns_mod, tmp_path_factory.mktemp("gateway-lab"))
    try:
        yield g
        g.stop()
        g.assert_capture_works()
        g.assert_no_leaks()
    finally:
        g.close()


@pytest.fixture(scope="module")
def gw(_gateway_lab):
    """The gateway lab; at each module's end the internet host saw nothing from the client."""
    yield _gateway_lab
    _gateway_lab.assert_no_leaks()


def nftdivert_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "nftdivert", *args]


@pytest.fixture
def cli_env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def pytest_sessionfinish(session, exitstatus):
    unprivileged.cleanup()
    left = netns_mod.leftovers()
    if left:  # a fixture failed to clean up: make that loud, and clean anyway
        for name in left:
            netns_mod.Netns(name).delete()
        print(f"\nERROR: network namespaces were left behind: {left}", file=sys.stderr)
        session.exitstatus = 1
    stale = netns_mod.remove_stale() if os.geteuid() == 0 else []
    if stale:  # not this run's fault: an earlier one was killed before its cleanup
        print(f"\nremoved namespaces of an earlier, killed test run: {stale}", file=sys.stderr)
