"""xt backend: the two queue rules through iptables-nft (nft_compat + xt_NFQUEUE).

For kernels built without CONFIG_NFT_QUEUE. libnftables cannot create xt
targets, so these rules go in with iptables-nft-restore, one batch per
family, at mangle INPUT (-150) and raw OUTPUT (-300). The nft table marks
the packets to queue; every rule carries the comment `nftdivert:<table>` and
removal deletes exactly the rules with that comment.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess

from nftdivert.config import XT_QUEUE
from nftdivert.errors import KernelError
from nftdivert.ruleset.model import Ruleset
from nftdivert.ruleset.render import XT_TAG_PREFIX, render_xt_rules
from nftdivert.ruleset.backends.base import QueueBackend

_TOOLS = {"ipv4": ("iptables-nft-restore", "iptables-nft-save", "ip"),
          "ipv6": ("ip6tables-nft-restore", "ip6tables-nft-save", "ip6")}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KernelError(f"{name} is missing: the xt queue backend needs the iptables package (iptables-nft)")
    return path


def _run(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _tagged(save_output: str, tag: str) -> dict[str, list[str]]:
    """The rules carrying `tag`, by iptables table, as `-A CHAIN ...` lines."""
    found: dict[str, list[str]] = {}
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and tag in shlex.split(line):
            found.setdefault(table, []).append(line)
    return found


class XtQueue(QueueBackend):
    name = XT_QUEUE
    auto_reason = "auto: the kernel has no nft queue statement (CONFIG_NFT_QUEUE), using iptables-nft NFQUEUE"

    def _save(self, family: str) -> str:
        return _run([_tool(_TOOLS[family][1])])

    def installed(self, table: str) -> list[str]:
        tag = f"{XT_TAG_PREFIX}{table}"
        lines = []
        for family in _TOOLS:
            for ipt_table, rules in sorted(_tagged(self._save(family), tag).items()):
                lines += [f"{family} {ipt_table} {rule}" for rule in rules]
        return lines

    def expected(self, rs: Ruleset) -> list[str]:
        lines = []
        restore = render_xt_rules(rs)
        for family in rs.families:
            for ipt_table, rules in sorted(_tagged(restore, f"{XT_TAG_PREFIX}{rs.table}").items()):
                lines += [f"{family} {ipt_table} {rule}" for rule in rules]
        return lines

    def install(self, rs: Ruleset) -> None:
        if self.installed(rs.table) == self.expected(rs):
            return  # re-apply: keep the rules, with no gap in which nothing is queued
        self.remove(rs.table)
        restore = render_xt_rules(rs)
        for family in rs.families:
            _run([_tool(_TOOLS[family][0]), "--noflush"], stdin=restore)

    def restore(self, table: str, lines: list[str]) -> None:
        """Make the rules tagged for `table` exactly `lines` again (as installed() gave them)."""
        if not lines:
            self.remove(table)
            return
        now = self.installed(table)
        for family, (restore_cmd, _, _) in _TOOLS.items():
            changes: dict[str, list[str]] = {}
            for line in now:  # first take away what is not wanted, then put back what is
                if line not in lines and line.startswith(f"{family} "):
                    _, ipt_table, rule = line.split(" ", 2)
                    changes.setdefault(ipt_table, []).append("-D" + rule[2:])
            for line in lines:
                if line not in now and line.startswith(f"{family} "):
                    _, ipt_table, rule = line.split(" ", 2)
                    changes.setdefault(ipt_table, []).append(rule)
            if changes:
                batch = [x for t, rules in changes.items() for x in (f"*{t}", *rules, "COMMIT")]
                _run([_tool(restore_cmd), "--noflush"], stdin="\n".join(batch) + "\n")

    def remove(self, table: str) -> int:
        tag = f"{XT_TAG_PREFIX}{table}"
        removed = 0
        for family, (restore_cmd, _, nft_family) in _TOOLS.items():
            if shutil.which(restore_cmd) is None:
                continue  # no iptables, so no rules of ours either
            tagged = _tagged(self._save(family), tag)
            if not tagged:
                continue
            batch = []
            for ipt_table, rules in tagged.items():
                batch.append(f"*{ipt_table}")
                batch += ["-D" + rule[2:] for rule in rules]
                batch.append("COMMIT")
                removed += len(rules)
            _run([restore_cmd, "--noflush"], stdin="\n".join(batch) + "\n")
            self._drop_empty_tables(nft_family, tagged)
        return removed

    def _drop_empty_tables(self, nft_family: str, touched: dict[str, list[str]]) -> None:
        # iptables-nft creates its tables on first use. One that now holds no
        # rule and only accepting built-in chains means nothing; leaving it
        # would leave a trace of us in the kernel.
        for ipt_table in touched:
            objects = self.nft.json(f"list table {nft_family} {ipt_table}")
            chains = [o["chain"] for o in objects if "chain" in o]
            busy = any(k in o for o in objects for k in ("rule", "set", "map", "flowtable", "counter"))
            if busy or any(c.get("policy", "accept") != "accept" or "hook" not in c for c in chains):
                continue
            self.nft.run(f"delete table {nft_family} {ipt_table}\n", source="cleanup")
