"""The netlink package is the floor: it imports nothing of nftdivert's but itself (and errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import nftdivert.netlink

ALLOWED = ("nftdivert.netlink", "nftdivert.errors")


def test_netlink_imports_nothing_above_it():
    found = []
    for path in Path(nftdivert.netlink.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [(path.name, n) for n in names if n.startswith("nftdivert") and not n.startswith(ALLOWED)]
    assert found == []
