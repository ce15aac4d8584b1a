"""The one door to the kernel's nftables: libnftables through its Python bindings."""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from nftdivert.config import XT_QUEUE, check_table_syntax
from nftdivert.ruleset import keywords
from nftdivert.errors import MESSAGE_LINE_CHARS, ConfigError, KernelError, PermissionProblem, clip


def _library():
    try:
        import nftables  # the distribution's python3-nftables, matching libnftables
    except ImportError:
        raise KernelError(
            "the nftables Python bindings are missing: install the distribution's "
            "python3-nftables (a venv needs --system-site-packages to see them)"
        ) from None
    return nftables


class Nft:
    """A libnftables context. Text in, text or JSON out, errors raised."""

    def __init__(self) -> None:
        self._ctx = _library().Nftables()
        self._ctx.set_handle_output(False)

    def run(self, commands: str, *, dry_run: bool = False, source: str = "ruleset") -> str:
        """Run nft commands as one transaction; with dry_run the kernel checks, nothing changes.

        The text goes through a file because libnftables then reports errors
        as `source:line:columns`, which a buffer does not.
        """
        refuse_file_reads(commands, source)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".nft", prefix="nftdivert-") as f:
            f.write(commands)
            f.flush()
            self._ctx.set_dry_run(dry_run)
            try:
                rc, out, err = self._ctx.cmd_from_file(f.name)
            finally:
                self._ctx.set_dry_run(False)
        if rc != 0:
            raise _kernel_error(err.replace(f.name, source))
        return out

    def list_table(self, table: str, *, stateless: bool = True, family: str = "inet") -> str | None:
        """The table as nft prints it (its normal form), or None when it is not loaded."""
        self._ctx.set_stateless_output(stateless)
        try:
            rc, out, err = self._ctx.cmd(f"list table {table_ref(table, family)}")
        finally:
            self._ctx.set_stateless_output(False)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise _kernel_error(err)
        return out

    def list_tables(self, table: str, *, stateless: bool = True) -> str | None:
        """nftdivert's tables of that name (inet, then bridge) as nft prints them; None when neither is loaded."""
        found = [text for family in FAMILIES
                 if (text := self.list_table(table, stateless=stateless, family=family)) is not None]
        return "".join(found) if found else None

    def json(self, command: str) -> list[dict[str, Any]]:
        """The `nftables` array of a fixed list command's JSON output ([] when absent).

        Only for command text with no user string in it; names go through
        json_cmd(), where they are JSON strings and never nft syntax.
        """
        self._ctx.set_json_output(True)
        try:
            rc, out, err = self._ctx.cmd(command)
        finally:
            self._ctx.set_json_output(False)
        return _json_result(rc, out, err)

    def json_cmd(self, *commands: dict[str, Any]) -> list[dict[str, Any]]:
        """libnftables' JSON input: each command an object like {"list": {"table": {...}}}."""
        self._ctx.set_json_output(True)  # libnftables 1.0 parses JSON input only with JSON output on
        try:
            rc, out, err = self._ctx.cmd(json.dumps({"nftables": list(commands)}))
        finally:
            self._ctx.set_json_output(False)
        return _json_result(rc, out, err)

    def table_objects(self, table: str, family: str = "inet") -> list[dict[str, Any]]:
        """Everything in the table as JSON objects ([] when it is not loaded)."""
        return self.json_cmd({"list": {"table": {"family": family, "name": table}}})

    def delete_table(self, table: str, family: str = "inet") -> None:
        self.json_cmd({"delete": {"table": {"family": family, "name": table}}})

    def has_table(self, table: str, family: str = "inet") -> bool:
        return any("table" in o and o["table"]["name"] == table and o["table"]["family"] == family
                   for o in self.json("list tables"))


def _json_result(rc: int, out: str, err: str) -> list[dict[str, Any]]:
    if rc != 0:
        if "No such file or directory" in err:
            return []
        raise _kernel_error(err)
    return json.loads(out).get("nftables", []) if out.strip() else []


# What nft's scanner reads as text it will not act on: a quoted string (no
# escapes, may span lines) or a comment to the end of the line. An `include`
# anywhere else is a token, whatever surrounds it (`;`, a block, a `\`-newline).
_INERT = re.compile(r'"[^"]*"|#[^\n]*')
_INCLUDE = re.compile(r"(?<![A-Za-z0-9_])include(?![A-Za-z0-9_])")


def refuse_file_reads(text: str, source: str) -> None:
    """Refuse nft text that would make libnftables read another file: `include`.

    nftdivert never renders one; in a ruleset given to `check` it would read
    a file the user did not name (`include "/dev/zero"` never ends). Checked
    before libnftables sees the text. Raises ConfigError naming the line.
    """
    code = _INERT.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)  # blanked, line numbers kept
    found = _INCLUDE.search(code)
    if found:
        number = code.count("\n", 0, found.start()) + 1
        raise ConfigError(f"{source}:{number}", text.split("\n")[number - 1].strip(),
                          "an `include` makes nft read another file; nftdivert checks only the text it is given")


FAMILIES = ("inet", "bridge")  # nftdivert's tables: the ruleset's, and gateway mode's bridge table


def table_ref(table: str, family: str = "inet") -> str:
    """`inet NAME` for nft command text: the one place a table name enters nft syntax.

    nft cannot quote a table name, so a name is only ever let through whole,
    after the config's rule for table names (letters, digits, '_').
    """
    check_table_syntax(table)
    if family not in FAMILIES:
        raise ValueError(f"not a family of nftdivert's tables: {family!r}")
    return f"{family} {table}"


def _kernel_error(err: str) -> KernelError:
    err = "\n".join(map(_short_line, err.strip().splitlines()))
    if "Operation not permitted" in err:
        return PermissionProblem(
            "the kernel refused: changing nftables needs root (CAP_NET_ADMIN); "
            "`nftdivert check` works unprivileged through a user namespace\n" + err)
    if "Could not process rule: No such file or directory" in err:
        # The kernel knows no expression of that name: a module or option is missing.
        hint = ("\nthe kernel lacks the nft queue statement (CONFIG_NFT_QUEUE): "
                f'set [queue] backend = "auto" or "{XT_QUEUE}"' if "queue num" in err else
                "\nthe kernel lacks support for an expression on that line "
                "(a module or kernel option; see docs/getting-started.md, Compatibility)")
        return KernelError(err + hint)
    return KernelError(err)


def _short_line(line: str) -> str:
    """nft repeats the offending line and marks it: a megabyte-long line stays a short one."""
    if len(line) <= MESSAGE_LINE_CHARS:
        return line
    if set(line.strip()) <= set("^~"):  # the marker line under it
        return f"^ (at column {len(line) - len(line.lstrip()) + 1})"
    return clip(line.expandtabs(8))


def check_table_name(table: object, key: str = "table", *, parser: bool = True) -> None:
    """Every table name from the user passes here on its way to the kernel: the
    config's syntax rule and the listed keywords, then the installed parser (a
    newer nft may know words the list does not). parser=False: without
    libnftables, for `render`."""
    check_table_syntax(table, key)
    if table in keywords.RESERVED or (parser and is_reserved_word(table)):  # type: ignore[arg-type]
        raise ConfigError(key, table, keywords.KEYWORD_REASON)


def is_reserved_word(name: str) -> bool:
    """Whether nft's parser takes `name` for a keyword (`drop`, `counter`, ...).

    nft cannot quote a table name, and its keyword list grows with each
    release, so ask the parser itself: a dry run that fails on syntax never
    reaches the kernel, so this works unprivileged too.
    """
    ctx = _library().Nftables()
    ctx.set_dry_run(True)
    # Unprivileged, libnftables writes "you must be root" straight to fd 2
    # once past the parser; that is not this question's answer.
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            rc, _, err = ctx.cmd(f"add table {table_ref(name)}")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return rc != 0 and "syntax error" in err


def is_root() -> bool:
    return os.geteuid() == 0
