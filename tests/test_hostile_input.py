"""Hostile input at the command line: table names that smuggle nft commands,
configs and rulesets that would exhaust memory or stack, values that would
flood the terminal. Every one is bad input: one line, exit 2, nothing touched.

Commands that touch the kernel run in a network namespace of their own, next
to foreign tables that must come through untouched.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading

import pytest

from conftest import REPO, nftdivert_argv

# What a regression may cost before it fails instead of exhausting the machine.
MEMORY_CAP = 1 << 30

FOREIGN = """\
table inet keepme {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept
	}
}
table ip keepme4 {
	set blocked {
		type ipv4_addr
		elements = { 192.0.2.9 }
	}
}
"""

# Each smuggled nft after a table name; found by trying (issue #10): the
# first deleted a foreign table with exit 0, the second made a drop-all
# input chain, the third crashed libnftables (exit 139).
ATTACKS = [
    pytest.param("keepme; delete table ip keepme4", id="delete-foreign-table"),
    pytest.param("keepme; add table ip evil; add chain ip evil c "
                 "{ type filter hook input priority 0; policy drop; }", id="drop-all-input-chain"),
    pytest.param("keepme; delete table inet keepme", id="segfault"),
]


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def run(*argv: str, ns=None, input: str | bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """nftdivert with a memory cap, in `ns` when given."""
    full = nftdivert_argv(*argv)
    if ns is not None:
        full = ns.argv(*full)
    return subprocess.run(full, capture_output=True, text=not isinstance(input, bytes), input=input,
                          timeout=timeout, preexec_fn=_capped, env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def assert_bad_input(proc: subprocess.CompletedProcess, *fragments: str, max_len: int = 400) -> str:
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode()
    assert proc.returncode == 2, f"exit {proc.returncode}\nstderr: {err[:2000]}"
    assert "Traceback" not in err, err[:5000]
    assert err.count("\n") == 1 and len(err) < max_len, f"not one short line ({len(err)} chars): {err[:500]}"
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---- table names ----------------------------------------------------------------------------

@pytest.fixture
def foreign(host):
    """A namespace holding two foreign tables; returns it and their listing."""
    host.run("nft", "-f", "-", input=FOREIGN)
    return host, host.run("nft", "list", "ruleset").stdout


@pytest.mark.kernel
@pytest.mark.parametrize("command", ["status", "remove"])
@pytest.mark.parametrize("name", ATTACKS)
def test_a_table_name_carrying_nft_commands_is_refused_and_touches_nothing(foreign, command, name):
    ns, before = foreign
    proc = run(command, "-t", name, ns=ns)
    assert_bad_input(proc, "bad config: table = ", "table names are 1-32 letters")
    assert proc.stdout == ""
    assert ns.run("nft", "list", "ruleset").stdout == before


@pytest.mark.kernel
@pytest.mark.parametrize("name", ATTACKS)
def test_the_engine_passes_names_to_libnftables_as_json_never_as_nft_text(foreign, name):
    # Even past the CLI's check, a name is a JSON string to libnftables, not syntax:
    # the smuggled commands name no table, so nothing is loaded and nothing goes.
    ns, before = foreign
    script = ("import sys\nfrom nftdivert.ruleset import engine\nfrom nftdivert.ruleset.kernel import Nft\n"
              "nft = Nft()\nst = engine.status(sys.argv[1], nft)\n"
              "print(st.loaded, engine.remove(sys.argv[1], nft))\n")
    proc = ns.run(sys.executable, "-c", script, name, env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin"},
                  check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "False []\n"
    assert ns.run("nft", "list", "ruleset").stdout == before


def test_the_nft_text_door_refuses_a_name_it_cannot_quote():
    from nftdivert.errors import ConfigError
    from nftdivert.ruleset.kernel import table_ref

    assert table_ref("nftdivert") == "inet nftdivert"
    with pytest.raises(ConfigError, match="table names are"):
        table_ref("keepme; delete table ip keepme4")


# ---- reading configs and rulesets -----------------------------------------------------------

def test_a_deeply_nested_config_is_one_line_not_a_recursion_error(tmp_path):
    for i, text in enumerate(["a = " + "[" * 2048, "[" * 2048, "a = " + "{ b = " * 1000]):
        cfg = tmp_path / f"nested{i}.toml"
        cfg.write_text(text)
        assert_bad_input(run("render", "-c", str(cfg)), "bad config: --config = ", "not valid TOML")


def test_a_config_that_never_ends_is_refused_unread():
    # Before: read to the end, 24 GB and an OOM kill. Capped here, it would fail instead.
    assert_bad_input(run("render", "-c", "/dev/zero", timeout=30), "'/dev/zero': not a regular file or a pipe")


def test_a_fifo_nobody_writes_is_refused_after_a_bounded_wait_and_a_pipe_is_read(tmp_path):
    # Before: the open blocked until a writer came, that is forever.
    from nftdivert.config import INPUT_WAIT

    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    assert_bad_input(run("render", "-c", str(fifo), timeout=INPUT_WAIT + 30),
                     f"a pipe that nothing was written to for {INPUT_WAIT:g} s")
    # A FIFO with a writer (as `-c <(cat file)` is a pipe with one): read to its end.
    writer = threading.Thread(target=fifo.write_text, args=('mode = "local"\n',))
    writer.start()
    proc = run("render", "-c", str(fifo))
    writer.join(timeout=30)
    assert proc.returncode == 0 and "mode: local" in proc.stdout, proc.stderr


def test_a_config_over_the_cap_is_refused_from_a_file_and_from_a_pipe(tmp_path):
    from nftdivert.config import MAX_INPUT_BYTES

    big = "# padding\n" * (MAX_INPUT_BYTES // 10 + 1)
    cfg = tmp_path / "big.toml"
    cfg.write_text(big)
    assert_bad_input(run("render", "-c", str(cfg)), "larger than 1024 KiB")
    assert_bad_input(run("render", "-c", "/dev/stdin", input=big), "larger than 1024 KiB")
    cfg.write_text(big[:MAX_INPUT_BYTES])  # at the cap: read, and only comments
    assert run("render", "-c", str(cfg)).returncode == 0


def test_a_huge_bad_value_is_shown_cut_short(tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text('mode = "' + "g" * 900_000 + '"\n')
    err = assert_bad_input(run("render", "-c", str(cfg)), "bad config: mode = 'ggg", "must be one of")
    print(f"\n{err.strip()}")


def test_a_key_with_a_newline_stays_on_one_line(tmp_path):
    cfg = tmp_path / "key.toml"
    cfg.write_text('"mo\\nde" = 1\n')
    assert_bad_input(run("render", "-c", str(cfg)), r"mo\nde = 1: unknown key")


@pytest.mark.kernel
def test_check_of_a_ruleset_that_is_not_utf8_is_bad_input(host, tmp_path):
    ruleset = tmp_path / "latin1.nft"
    ruleset.write_bytes('table inet caf\xe9 {\n}\n'.encode("latin-1"))
    assert_bad_input(run("check", str(ruleset), ns=host), "RULESET = ", "not UTF-8 text (byte 14)")
    assert_bad_input(run("check", "/dev/zero", ns=host), "not a regular file or a pipe")


@pytest.mark.kernel
def test_the_kernels_error_on_a_huge_line_stays_short(host, tmp_path):
    ruleset = tmp_path / "long.nft"
    ruleset.write_text("table inet x { chain c { " + "tcp dport 1 " * 50_000 + "bogus } }\n")
    proc = run("check", str(ruleset), ns=host)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[:2000]
    assert "syntax error" in proc.stderr and "^ (at column " in proc.stderr, proc.stderr[:2000]
    assert len(proc.stderr) < 2000 and max(map(len, proc.stderr.splitlines())) < 400, proc.stderr[:2000]


# ---- failures outside the config -------------------------------------------------------------

def test_a_stdout_that_fails_is_one_line_and_exit_1():
    with open("/dev/full", "w") as full:
        proc = subprocess.run(nftdivert_argv("render"), stdout=full, stderr=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(REPO)}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "nftdivert: No space left on device\n"


def test_every_error_type_has_its_exit_status():
    from nftdivert import errors

    assert errors.report(errors.ConfigError("k", "v", "why")) == ("nftdivert: bad config: k = 'v': why", 2)
    assert errors.report(errors.TableTaken("taken")) == ("nftdivert: taken", 1)
    assert errors.report(errors.DriftFound("drift")) == ("", 1)
    message, status = errors.report(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert status == 2 and message.startswith("nftdivert: bad input: not UTF-8 text")
    assert errors.report(FileNotFoundError(2, "No such file or directory", "/x")) == (
        "nftdivert: /x: No such file or directory", 1)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.report(ZeroDivisionError())


def test_shown_values_are_bounded_in_length_and_depth():
    from nftdivert.errors import MESSAGE_LINE_CHARS, shown

    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert shown(deep) == "[[[[...]]]]"
    assert len(shown("x" * 10**6)) < MESSAGE_LINE_CHARS
    assert shown("a\nb") == "'a\\nb'"


# ---- rulesets that make nft read other files ------------------------------------------------

# nft follows `include` wherever its scanner meets the word as a token: at the
# top, inside a table or chain block, after a `;`, past a line continuation,
# and with a glob. /dev/zero never ends: before, check read it until the cap.
INCLUDES = [
    pytest.param('include "/dev/zero"\n', 1, id="dev-zero"),
    pytest.param('flush ruleset; include "/etc/passwd"\n', 1, id="after-semicolon"),
    pytest.param('table inet x {\n\tinclude "/etc/nftables.conf"\n}\n', 2, id="in-a-block"),
    pytest.param('# a comment\ntable inet x {\n\tchain c {\n\t\tinclude "/dev/zero"\n\t}\n}\n', 4, id="in-a-chain"),
    pytest.param('table inet x { comment "one\nline" }; include \\\n "/dev/zero"\n', 2, id="continued"),
    pytest.param('include "/etc/*"\n', 1, id="glob"),
    pytest.param('include "relative.nft"\n', 1, id="search-path"),
]


@pytest.mark.kernel
@pytest.mark.parametrize("text, line", INCLUDES)
def test_check_refuses_a_ruleset_that_includes_other_files(host, tmp_path, text, line):
    ruleset = tmp_path / "with-include.nft"
    ruleset.write_text(text)
    err = assert_bad_input(run("check", str(ruleset), ns=host, timeout=30),
                           f"{ruleset}:{line} = ", "`include` makes nft read another file")
    print(f"\n{err.strip()}")


@pytest.mark.kernel
def test_the_word_include_in_a_comment_or_a_string_is_no_include(host, tmp_path):
    ruleset = tmp_path / "no-include.nft"
    ruleset.write_text("# include \"/dev/zero\"\n"
                       "table inet nd_incl {\n"
                       "\tcomment \"include '/dev/zero'\"\n"
                       "\tchain include_not {\n\t}\n"
                       "}\n")
    proc = run("check", str(ruleset), ns=host, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_no_command_hands_libnftables_an_include():
    # The door itself refuses, whoever calls it (apply, diff's scratch namespace, check).
    from nftdivert.errors import ConfigError
    from nftdivert.ruleset.kernel import refuse_file_reads

    with pytest.raises(ConfigError, match="ruleset:2 = "):
        refuse_file_reads('table inet x {\n}; include "/dev/zero"\n', "ruleset")
    refuse_file_reads('table inet x { comment "include"; }  # include "/dev/zero"\n', "ruleset")
    # Lines are nft's: only a newline ends one (not a carriage return or U+2028).
    with pytest.raises(ConfigError, match="ruleset:2 = 'include"):
        refuse_file_reads('# a\rb\u2028c\ninclude "/dev/zero"\n', "ruleset")
