"""What `make dist` builds is all a second gateway needs: the code, the templates,
the systemd unit and the example config; installed, it renders what the checkout does.

Nothing here touches the package index: the wheel is built with the setuptools
the venv already has and installed without its dependencies into a throwaway
venv, which borrows them from this one. One test runs a sandbox from it on the
real kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import harness
from conftest import REPO
from nftdivert import config as config_mod
from nftdivert.ruleset import owner

UNIT = REPO / "contrib" / "systemd" / "nftdivert.service"
EXAMPLE_CONFIG = REPO / "contrib" / "nftdivert.toml"
INSTALL_DOC = REPO / "docs" / "install.md"
# Where docs/install.md puts the venv and the config; the unit names both.
PREFIX = "/opt/nftdivert"
CONFIG_PATH = "/etc/nftdivert/nftdivert.toml"
DATA_FILES = {"share/nftdivert/nftdivert.service": UNIT, "share/nftdivert/nftdivert.toml": EXAMPLE_CONFIG,
              "share/doc/nftdivert/install.md": INSTALL_DOC}


def run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}: {proc.stderr!s}"
    return proc


@pytest.fixture(scope="module")
def scratch():
    """A directory outside the checkout, gone after this module."""
    with tempfile.TemporaryDirectory(prefix="nftdivert-dist-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def dist(scratch) -> Path:
    """The Makefile's own `dist` recipe, into a directory of ours, with this venv (never rebuilt here)."""
    out = scratch / "dist"
    run(["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "-o", ".cache/apt.stamp",
         f"PY={sys.executable}", f"DIST={out}", "dist"])
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (found,) = dist.glob("nftdivert-*-py3-none-any.whl")
    return found


@pytest.fixture(scope="module")
def installed(scratch, wheel) -> Path:
    """A venv as docs/install.md makes one (system site packages: python3-nftables), the wheel in it.

    Its other dependencies come from this venv through a .pth line: a path
    added that way has its own .pth files (this checkout's editable install)
    ignored, so `nftdivert` can only be the wheel's.
    """
    venv = scratch / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
         "--no-deps", "--no-index", str(wheel)])
    site = Path(run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    text=True).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def test_wheel_ships_every_module_and_template(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "nftdivert").rglob("*.py")}
    templates = {f"nftdivert/templates/{p.name}" for p in (REPO / "templates").glob("*.j2")}
    assert {"nftdivert/templates/ruleset.nft.j2", "nftdivert/templates/report.html.j2"} <= templates
    assert modules - names == set(), "setup.cfg's packages miss these"
    assert templates - names == set()
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    assert data == set(DATA_FILES)


def test_wheel_does_not_ask_pip_for_the_distributions_nftables(wheel):
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    required = [line.split(":", 1)[1].split()[0].lower() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert "jinja2" in required and "netfilterqueue" in required
    assert not [name for name in required if "nftables" in name]


def test_sdist_builds_the_same_wheel(dist, scratch):
    (sdist,) = dist.glob("nftdivert-*.tar.gz")
    again = scratch / "from-sdist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(again), str(sdist)], cwd=scratch)
    (rebuilt,) = again.glob("*.whl")
    (original,) = dist.glob("*.whl")
    assert set(zipfile.ZipFile(rebuilt).namelist()) == set(zipfile.ZipFile(original).namelist())


def test_installed_wheel_answers_as_the_checkout(installed, scratch):
    """From another directory, the installed command renders byte for byte what the checkout renders."""
    where = run([str(installed / "bin" / "python"), "-c", "import nftdivert; print(nftdivert.__file__)"],
                cwd=scratch, text=True).stdout
    assert where.startswith(str(installed))
    config = installed / "share" / "nftdivert" / "nftdivert.toml"
    log = scratch / "empty.jsonl"
    log.write_text("")
    checkout = Path(sys.executable).parent / "nftdivert"
    for args in (["--help"], ["run", "--help"], ["render"], ["render", "--backend", "xt"], ["render", "--after-stop"],
                 ["render", "--divert-path", "kernel"], ["render", "--config", str(config)]):
        ours = run([str(installed / "bin" / "nftdivert"), *args], cwd=scratch).stdout
        assert ours == run([str(checkout), *args], cwd=REPO).stdout, args
    pages = []
    for command in (installed / "bin" / "nftdivert", checkout):
        page = scratch / f"report-{len(pages)}.html"
        run([str(command), "report", str(log), "-o", str(page)], cwd=scratch)
        pages.append(page.read_bytes())
    assert pages[0] == pages[1] and b"<html" in pages[0]


@pytest.mark.kernel
def test_installed_wheel_runs_a_sandbox_whose_curl_reaches_any_name(installed, scratch):
    """Started from the wheel alone (no checkout on the path): curl in a sandbox gets the
    HTTP answer, and the log names the name and the port it asked for."""
    cfg = scratch / "sandbox.toml"
    cfg.write_text(harness.DIVERT_PATH_LINE + f'[queue]\nbackend = "{harness.BACKEND}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SUDO_UID", "SUDO_GID")}
    proc = subprocess.run([str(installed / "bin" / "nftdivert"), "sandbox", "-c", str(cfg), "--log-format", "json",
                           "--", "curl", "-sS", "-4", "--max-time", "10", "http://wheel.example:8080/from-the-wheel"],
                          capture_output=True, text=True, timeout=120, cwd=scratch, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "<h1>Welcome</h1>" in proc.stdout
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    starts = [r for r in records if r.get("event") == "start" and r.get("protocol") == "tcp"]
    assert [(r["name"], r["original_destination"].rsplit(":", 1)[1]) for r in starts] == [("wheel.example", "8080")]


def _unit() -> dict[str, list[str]]:
    """key -> its values, in order ([Service] and the others alike; no key repeats across sections here)."""
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


def _unescape(value: str) -> str:
    """A unit's command line as the shell gets it: `$$` and `%%` are systemd's escapes."""
    return value.replace("$$", "$").replace("%%", "%")


def test_unit_runs_the_installed_command_with_the_documented_config():
    unit = _unit()
    (start,) = unit["ExecStart"]
    assert start.split() == [f"{PREFIX}/bin/nftdivert", "run", "--config", CONFIG_PATH]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"] and unit["RestartPreventExitStatus"] == ["2"]
    assert unit["KillMode"] == ["mixed"]  # the run stops its own children
    doc = INSTALL_DOC.read_text()
    for needed in (CONFIG_PATH, f"{PREFIX}/bin/pip install", "--system-site-packages", "python3-nftables",
                   "systemctl reload nftdivert", "nftdivert remove"):
        assert needed in doc, needed


def test_unit_lets_the_run_write_where_the_example_config_writes():
    """ProtectSystem=strict: every path the config (defaults included) writes is in a directory the unit makes."""
    unit = _unit()
    assert unit["ProtectSystem"] == ["strict"]
    writable = [f"/var/lib/{unit['StateDirectory'][0]}", f"/var/log/{unit['LogsDirectory'][0]}",
                f"/run/{unit['RuntimeDirectory'][0]}"]
    assert str(owner.STATE_DIR) in writable  # owner locks and the counters `status` reads

    def paths(node, key=""):
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                yield from paths(getattr(node, f.name), f"{key}.{f.name}")
        elif isinstance(node, str) and node.startswith("/"):
            yield key, node

    found = dict(paths(config_mod.load(str(EXAMPLE_CONFIG))))
    assert ".worker.log" in found and ".worker.pcap" in found and ".tls.state_dir" in found
    outside = {k: p for k, p in found.items() if not any(p == w or p.startswith(w + "/") for w in writable)}
    assert outside == {}


def test_unit_keeps_the_previous_capture(scratch):
    """ExecStartPre moves the last run's capture aside (the run truncates its pcap), and nothing else."""
    (pre,) = _unit()["ExecStartPre"]
    pcap = Path(tomllib.loads(EXAMPLE_CONFIG.read_text())["worker"]["pcap"])
    logs = scratch / "logs"
    logs.mkdir()
    command = _unescape(pre).replace(f"cd {pcap.parent} ", f"cd {logs} ")
    assert command != _unescape(pre) and pcap.name in command
    (logs / pcap.name).write_bytes(b"")  # an empty one: nothing to keep
    run(command, shell=True)
    assert sorted(p.name for p in logs.iterdir()) == [pcap.name]
    (logs / pcap.name).write_bytes(b"packets")
    os.utime(logs / pcap.name, (1700000000, 1700000000))
    run(command, shell=True)
    assert [(p.name, p.read_bytes()) for p in logs.iterdir()] == [("capture-20231114T221320Z.pcap", b"packets")]
    run(command, shell=True)  # none there: a first start
    assert [p.name for p in logs.iterdir()] == ["capture-20231114T221320Z.pcap"]


def test_systemd_accepts_the_unit(installed, scratch):
    """systemd-analyze verify, with ExecStart at the throwaway venv: it also checks that the command exists."""
    text = UNIT.read_text()
    assert text.count(f"{PREFIX}/bin/nftdivert ") == 1
    units = scratch / "units"
    units.mkdir()
    (units / UNIT.name).write_text(text.replace(f"{PREFIX}/bin/nftdivert ", f"{installed}/bin/nftdivert "))
    proc = subprocess.run(["systemd-analyze", "verify", str(units / UNIT.name)], capture_output=True, text=True,
                          timeout=60)
    # Unknown keys and bad values are only warnings on stderr, with exit status 0.
    assert (proc.returncode, proc.stderr) == (0, "")
