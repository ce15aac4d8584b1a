"""No module imports from a layer above its own (docs/concepts.md, Layout).

Bottom to top: plumbing (process, netlink, errors), the pure core (config,
ruleset, worker), what watches and answers (observers, services, report,
metrics, stats), the run (runner), the applications (cli, lab). Imports
inside functions count too: a late import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nftdivert

PACKAGE = Path(nftdivert.__file__).parent

LAYERS = {
    "nftdivert": 0, "nftdivert.process": 0, "nftdivert.netlink": 0, "nftdivert.errors": 0,
    "nftdivert.config": 1, "nftdivert.profiles": 1, "nftdivert.tasks": 1, "nftdivert.ruleset": 1, "nftdivert.worker": 1,
    "nftdivert.observers": 2, "nftdivert.services": 2, "nftdivert.report": 2, "nftdivert.metrics": 2,
    "nftdivert.stats": 2,
    "nftdivert.runner": 3,
    "nftdivert.cli": 4, "nftdivert.lab": 4, "nftdivert.__main__": 4,
}

# Known upward imports, each to go with a change under way elsewhere:
# (importing module, imported module).
PENDING: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    """The layer of `module`: that of its longest listed prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        found = LAYERS.get(".".join(parts[:end]))
        if found is not None:
            return found
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path, path: Path, module: str):
    """(line, imported module, as written) for each import in the file, at any depth."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package it is in, or one above per extra dot
                base = ".".join(package[:len(package) + 1 - node.level] + ([base] if base else []))
            written = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for alias in node.names:
                yield node.lineno, _submodule(root, base, alias.name), written


def _submodule(root: Path, package: str, name: str) -> str:
    """What `from package import name` imports: the module package.name if there is one."""
    if package == "nftdivert":  # `from nftdivert import runner`: it exports nothing else
        return f"{package}.{name}"
    below = root.joinpath(*package.split("."), name)
    return f"{package}.{name}" if below.is_dir() or below.with_suffix(".py").is_file() else package


def upward_imports(package: Path = PACKAGE) -> list[tuple[str, int, str, str]]:
    """(module, line, imported module, the import as written), once per module imported."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(package.parent, path)
        own = layer(module)
        for line, target, written in imports(package.parent, path, module):
            if target.split(".")[0] == "nftdivert" and layer(target) > own:
                if (module, line, target, written) not in found:
                    found.append((module, line, target, written))
    return found


def test_no_module_imports_from_a_layer_above():
    found = upward_imports()
    for module, line, target, written in found:
        print(f"{module}:{line}: {written}  (layer {layer(module)} imports {target}, layer {layer(target)})")
    offending = [f"{m}:{line}: {w}" for m, line, t, w in found if (m, t) not in PENDING]
    assert not offending, "imports from a higher layer:\n" + "\n".join(offending)


def test_every_pending_exception_is_still_needed():
    """An entry in PENDING whose import is gone must go too, or it would hide a new one."""
    found = {(m, t) for m, _, t, _ in upward_imports()}
    assert PENDING <= found, f"no longer imported, drop from PENDING: {sorted(PENDING - found)}"


def test_a_late_upward_import_is_found(tmp_path):
    """The check sees imports inside functions, and relative ones."""
    sub = tmp_path / "nftdivert" / "worker"
    sub.mkdir(parents=True)
    code = sub / "probe.py"
    code.write_text("def f():\n    from nftdivert import runner\n    from ..lab import sandbox\n"
                    "    from . import fixup\n    import nftdivert.cli\n")
    found = upward_imports(tmp_path / "nftdivert")
    assert [(m, line, t) for m, line, t, _ in found] == [
        ("nftdivert.worker.probe", 2, "nftdivert.runner"), ("nftdivert.worker.probe", 3, "nftdivert.lab"),
        ("nftdivert.worker.probe", 5, "nftdivert.cli")]
