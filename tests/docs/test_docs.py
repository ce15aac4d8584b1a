"""The docs against the code: every config key, log field, command and option is documented, every link resolves.

Fast and without root: the keys come from the config's dataclasses (what
`config.load` accepts), the log's fields from the code that builds the
records (logfields.py), the commands and options from the click app.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import typing

import click
import pytest

from logfields import ROOT, record_events, record_fields
from nftdivert import cli, config

DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")])
CONFIGURATION = DOCS / "reference/configuration.md"
LOG_SCHEMA = DOCS / "reference/log-schema.md"
CLI = DOCS / "reference/cli.md"


# ---- config keys ------------------------------------------------------------

def _tables(cls: type, prefix: str = "") -> dict[str, set[str]]:
    """Each TOML table's dotted name -> the keys `config.load` accepts there (a dataclass's fields)."""
    tables = {prefix: set()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        inner = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
        if dataclasses.is_dataclass(inner) and inner is not config.PortRange:
            tables.update(_tables(inner, f"{prefix}.{f.name}".lstrip(".")))  # a [section] or [[list]]
        else:
            tables[prefix].add(f.name)
    return tables


def _documented_keys(text: str) -> dict[str, set[str]]:
    """The reference's TOML: each table's keys, given or named in a comment (`file = "/path"`)."""
    block = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    tables: dict[str, set[str]] = {"": set()}
    current = ""
    for line in block.splitlines():
        header = re.match(r"\s*\[\[?([\w.]+)\]\]?", line)
        if header:
            current = header.group(1)
            tables.setdefault(current, set())
        tables[current] |= set(re.findall(r"(?:^|[#;,]|\b(?:or|and))\s*(\w+) =", line))
    return tables


def test_every_config_key_is_in_the_configuration_reference():
    documented = _documented_keys(CONFIGURATION.read_text())
    missing = [f"{table}.{key}".lstrip(".") for table, keys in _tables(config.Config).items()
               for key in sorted(keys) if key not in documented.get(table, set())]
    missing += [f"[{table}]" for table in _tables(config.Config) if table and table not in documented]
    assert not missing, f"{CONFIGURATION.relative_to(ROOT)} lacks {missing}"


def test_the_configuration_reference_is_a_config_that_loads():
    block = re.search(r"```toml\n(.*?)```", CONFIGURATION.read_text(), re.S).group(1)
    config.from_mapping(tomllib.loads(block))


# ---- the conversation log -----------------------------------------------------

def test_every_log_field_and_record_type_is_in_the_log_schema():
    text = LOG_SCHEMA.read_text()
    fields = record_fields()
    assert {"v", "event", "original_destination", "sni", "body_sha256", "facility"} <= set(fields)  # it reads them
    missing = {key: sorted(where)[0] for key, where in fields.items() if f"`{key}`" not in text}
    assert not missing, f"{LOG_SCHEMA.relative_to(ROOT)} lacks these fields (field: where a record gets it): {missing}"
    events = record_events()
    assert {"start", "end", "tls", "http", "admission"} <= events
    missing_events = sorted(e for e in events if f"`{e}`" not in text)
    assert not missing_events, f"{LOG_SCHEMA.relative_to(ROOT)} lacks these record types: {missing_events}"


# ---- commands and options -----------------------------------------------------

def _commands() -> dict[str, click.Command]:
    ctx = click.Context(cli.cli)
    return {name: cli.cli.get_command(ctx, name) for name in cli.cli.list_commands(ctx)}


def test_every_command_and_option_is_in_the_cli_reference():
    text = CLI.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `nftdivert (\w+)[^\n]*", text, re.M)}
    options = [re.split(r"(?<!\\)\|", row)[1:3] for row in re.findall(r"^\| `-.*", text, re.M)]
    missing = []
    for name, command in _commands().items():
        if name not in rows:
            missing.append(f"the row of `nftdivert {name}`")
            continue
        for param in command.params:
            if isinstance(param, click.Argument):
                if param.name.upper() not in rows[name].upper():
                    missing.append(f"{name}'s argument {param.name.upper()} in its row")
                continue
            if not any(opt in rows[name] for opt in param.opts):
                missing.append(f"{name}'s {'/'.join(param.opts)} in its row")
            if not any(all(f"`{opt}" in cell for opt in param.opts) and re.search(rf"\b{name}\b", commands)
                       for cell, commands in options):
                missing.append(f"{'/'.join(param.opts)} of {name} in the options table")
    for param in cli.cli.params:  # the group's own: --version
        if not any(all(f"`{opt}" in cell for opt in param.opts) for cell, _ in options):
            missing.append(f"nftdivert {'/'.join(param.opts)} in the options table")
    assert not missing, f"{CLI.relative_to(ROOT)} lacks {missing}"


# ---- links ---------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", _outside_code(path.read_text()), re.M)}


def links(path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", _outside_code(path.read_text()))
    return re.findall(r"\]\(([^)\s]+)\)", text)


# Pages the docs link to before they exist (the install guide): checked once they do.
PLANNED = {DOCS / "install.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if path in PLANNED and not path.exists():
            continue
        if not path.exists():
            broken.append(f"{link}: no such file")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
