"""The command line: help that teaches, exit statuses decided in one place."""

from __future__ import annotations

import subprocess

import pytest

from conftest import nftdivert_argv

COMMANDS = ["render", "check", "apply", "diff", "remove", "status", "run", "sandbox"]


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(nftdivert_argv(*args), capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, cli_env):
    proc = cli(command, "--help", env=cli_env)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"Usage: nftdivert {command}")
    assert len(proc.stdout.splitlines()) > 8  # says more than the usage line


def test_top_level_help_and_version(cli_env):
    proc = cli("--help", env=cli_env)
    assert proc.returncode == 0 and "Exit status: 0 success, 1 drift or failure, 2 bad input" in proc.stdout
    assert cli("--version", env=cli_env).stdout.startswith("nftdivert, version ")


@pytest.mark.parametrize("args, says", [
    (("frobnicate",), "No such command 'frobnicate' (see `nftdivert --help`)"),
    (("render", "--no-such-option"), "No such option '--no-such-option' (see `nftdivert render --help`)"),
    (("remove", "-t"), "Option '-t' requires an argument"),
    (("run", "--log-format", "xml"), "Invalid value for '--log-format': 'xml' is not one of"),
])
def test_a_command_line_the_parser_refuses_is_one_line_and_exit_2(args, says, cli_env):
    proc = cli(*args, env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("nftdivert: bad usage: ") and says in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("args", [("render",), ("remove", "-t")])
def test_a_table_name_nft_reads_as_a_keyword_is_bad_input(args, tmp_path, cli_env):
    cfg = tmp_path / "kw.toml"
    cfg.write_text('table = "counter"\n')
    argv = ("render", "-c", str(cfg)) if args == ("render",) else ("remove", "-t", "counter")
    proc = cli(*argv, env=cli_env)
    assert proc.returncode == 2
    assert "table = 'counter': nft reads this name as a keyword" in proc.stderr
    assert proc.stdout == ""


def test_render_default_is_deterministic_and_needs_no_kernel(cli_env):
    first, second = cli("render", env=cli_env), cli("render", env=cli_env)
    assert first.returncode == 0 and first.stdout == second.stdout
    assert "priority raw;" in first.stdout and "priority dstnat;" in first.stdout

