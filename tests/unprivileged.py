"""Python as an unprivileged user (by default uid and gid 65534, nobody), wherever the checkout is.

The checkout and its venv may sit where nobody can read them, such as a
clone under /root. So nobody's Python is the interpreter behind the venv (the
system's, whose dist-packages hold the `nftables` bindings), and it imports
from a world-readable copy of the package, its templates and its runtime
requirements. The copy is made once per test process and removed at the end
of the session.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

UID = 65534
REPO = Path(__file__).resolve().parent.parent
PYTHON = os.path.realpath(sys.executable)  # outside the venv: runs without reading it

_tree: Path | None = None


def _distributions() -> list[importlib.metadata.Distribution]:
    """nftdivert's runtime requirements (setup.cfg) and theirs, as installed in the venv."""
    from packaging.requirements import Requirement  # here: costly to import, seldom needed

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    todo = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n") if line.strip()]
    found: dict[str, importlib.metadata.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra, or another platform's
        dist = importlib.metadata.distribution(req.name)
        name = dist.metadata["Name"].lower()
        if name not in found:
            found[name] = dist
            todo += [Requirement(r) for r in dist.requires or []]
    return list(found.values())


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _build() -> Path:
    tree = Path(tempfile.mkdtemp(prefix="nftdivert-nobody-"))
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "nftdivert", tree / "nftdivert", ignore=ignore)
    shutil.copytree(REPO / "templates", tree / "templates", ignore=ignore)  # beside the package, as in a checkout
    for dist in _distributions():
        if not str(dist.locate_file("")).startswith(sys.prefix + os.sep):
            continue  # not the venv's: the system interpreter has it too
        for f in dist.files or ():
            if f.parts[0] != ".." and "__pycache__" not in f.parts and not f.parts[0].endswith(".dist-info"):
                _copy_file(Path(dist.locate_file(f)), tree / f)
    for root, dirs, files in os.walk(tree):  # whatever the umask was
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return tree


def tree() -> Path:
    global _tree
    if _tree is None:
        _tree = _build()
    return _tree


def script(path: str | Path) -> str:
    """A world-readable copy of one script (for example tests/harness.py)."""
    dst = tree() / "scripts" / Path(path).name
    if not dst.exists():
        _copy_file(Path(path), dst)
        dst.parent.chmod(0o755)
        dst.chmod(0o644)
    return str(dst)


def python(*args: str, uid: int = UID) -> list[str]:
    """argv: `python ARGS` as `uid` (gid the same, no groups). Run it with env().
    -P: nothing from the working directory (perhaps the checkout) comes before the copy."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", PYTHON, "-P", *args]


def env(base: dict | None = None) -> dict:
    """The environment for python(): nftdivert imports from the copy."""
    return dict(os.environ if base is None else base, PYTHONPATH=str(tree()))


def cleanup() -> None:
    global _tree
    if _tree is not None:
        shutil.rmtree(_tree, ignore_errors=True)
        _tree = None
