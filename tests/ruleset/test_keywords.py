"""The listed nft keywords (ruleset/keywords.py) against the installed parser,
and `render` saying no to a keyword without loading libnftables."""

from __future__ import annotations

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unprivileged
from conftest import REPO
from nftdivert.errors import ConfigError
from nftdivert.ruleset import keywords
from nftdivert.ruleset.kernel import check_table_name


def _words_in_libnftables() -> set[str]:
    """Every table-name-shaped word in the installed library (its keywords among them)."""
    name = ctypes.util.find_library("nftables")
    path = next((p for p in (Path(d) / name for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"))
                 if name and p.exists()), None)
    if path is None:
        pytest.skip("libnftables is not installed where this test looks")
    return {
        w.decode() for w in re.findall(rb"[A-Za-z][A-Za-z0-9_]{0,31}", path.read_bytes())}


# Asked of the parser as nobody: a name nft accepts then fails fast at
# "Operation not permitted" instead of a kernel round trip (thousands of words).
_SCAN = """
import sys, nftables
ctx = nftables.Nftables()
ctx.set_dry_run(True)
for word in sys.stdin.read().split():
    rc, _, err = ctx.cmd("add table inet " + word)
    if rc != 0 and "syntax error" in err:
        print(word)
"""


def _parser_reserves(words: set[str]) -> set[str]:
    drop = ["setpriv", f"--reuid={unprivileged.UID}", f"--regid={unprivileged.UID}", "--clear-groups"]
    argv = [*(drop if os.geteuid() == 0 else []), unprivileged.PYTHON, "-c", _SCAN]
    proc = subprocess.run(argv, input="\n".join(sorted(words)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_list_is_what_the_installed_parser_reserves():
    """A newer nft may reserve more: then the list must grow (the kernel-facing
    commands ask the parser anyway, but `render` only has the list)."""
    candidates = _words_in_libnftables() | keywords.RESERVED | {"nftdivert", "keepme", "lab_table"}
    reserved = _parser_reserves(candidates)
    assert reserved - keywords.RESERVED == set(), "nft reserves words the list lacks"
    assert keywords.RESERVED - reserved == set(), "listed words this nft accepts as a table name"


def test_a_listed_keyword_is_refused_without_the_parser():
    with pytest.raises(ConfigError, match="table = 'queue': nft reads this name as a keyword"):
        check_table_name("queue", parser=False)
    check_table_name("nftdivert", parser=False)


def test_render_never_loads_libnftables(tmp_path):
    """Including its table-name check: the output depends on the config alone."""
    code = ("import sys\nfrom nftdivert import cli\n"
            "for argv in (['render'], ['render', '--backend', 'xt'], ['render', '--after-stop'], "
            "['render', '-c', sys.argv[1]]):\n"
            "    try:\n        cli.main(argv)\n"
            "    except SystemExit as e:\n        print('exit', e.code, file=sys.stderr)\n"
            "print('loaded:', sorted(m for m in sys.modules if m.startswith('nftables')), file=sys.stderr)\n")
    bad = tmp_path / "kw.toml"
    bad.write_text('table = "counter"\n')
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert [line for line in proc.stderr.splitlines() if line.startswith(("exit", "loaded"))] == \
        ["exit 0", "exit 0", "exit 0", "exit 2", "loaded: []"], proc.stderr
    assert "table = 'counter': nft reads this name as a keyword" in proc.stderr
    assert "priority raw;" in proc.stdout
