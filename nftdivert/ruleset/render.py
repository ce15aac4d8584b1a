"""Ruleset text from the model: pure functions, byte-for-byte deterministic."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from nftdivert.ruleset import model
from nftdivert.config import NATIVE_QUEUE, Config
from nftdivert.ruleset.model import Ruleset

if TYPE_CHECKING:
    import jinja2

# iptables-nft rules carry this comment; removal matches it and nothing else.
XT_TAG_PREFIX = "nftdivert:"
XT_COMMANDS = {"ipv4": "iptables-nft", "ipv6": "ip6tables-nft"}


def template_dir() -> Path:
    # Installed: the templates ship as nftdivert.templates. From a checkout:
    # the top-level templates/ folder beside the package.
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here.parent.parent / "templates"):
        if (candidate / "ruleset.nft.j2").is_file():
            return candidate
    raise FileNotFoundError("nftdivert's templates are missing from this installation")


@functools.cache
def _environment() -> "jinja2.Environment":
    # Imported here: status, remove and the worker's edges never render, and
    # loading jinja2 costs seconds per process under emulation (the VM tier).
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def xt_tag(rs: Ruleset) -> str:
    return f"{XT_TAG_PREFIX}{rs.table}"


def render_xt_rules(rs: Ruleset) -> str:
    """The xt backend's queue rules in iptables-restore form (same for both families)."""
    return _environment().get_template("xt-queue.rules.j2").render(rs=rs, tag=xt_tag(rs))


def xt_rule_lines(rs: Ruleset) -> list[str]:
    """The xt rules as iptables-nft command lines, for people to read."""
    lines, table = [], ""
    for line in render_xt_rules(rs).splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A"):
            for family in rs.families:
                lines.append(f"{XT_COMMANDS[family]} -t {table} {line}")
    return lines


def render_after_stop(rs: Ruleset) -> str | None:
    """What a clean stop leaves loaded: the containment chain alone, or None for nothing."""
    if not rs.contain_after_stop:
        return None
    return _environment().get_template("after-stop.nft.j2").render(rs=rs)


def render_for(config: Config, backend: str | None = None) -> str:
    """The ruleset text for `config`; `auto` renders the native form, the kernel is not asked."""
    chosen = backend or (config.queue.backend if config.queue.backend != "auto" else NATIVE_QUEUE)
    return render(model.build(config, chosen))


def render(rs: Ruleset) -> str:
    """The full nftables ruleset for `rs`, loadable with `nft -f`."""
    xt = xt_rule_lines(rs) if rs.xt_queue else []
    return _environment().get_template("ruleset.nft.j2").render(rs=rs, xt_rules=xt)
