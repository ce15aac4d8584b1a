"""Every program the suite and the demo run comes from a package the Makefile installs.

The sources are read, not run: a program is the first word of a command the
tests or nftdivert start (an argv list, a `run`/`popen` argument, a shell
script), seen through `ip netns exec NS`, `setpriv ... --`, `unshare ...`,
`sh -c SCRIPT` and `nftdivert sandbox -- CMD`. Names held in variables are
followed when they are plain constants (`for tool in ("iptables-nft", ...)`,
`f"{tool}-save"`, `{...}[family]`). A name computed any other way is not seen:
keep program names literal.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

from programs import PACKAGES

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "nftdivert").rglob("*.py")])

# How a call's first argument is a command: an argv, a shell script, or the
# arguments of nftdivert itself.
EXECUTORS = {"run": "argv", "popen": "argv", "Popen": "argv", "check_output": "argv", "check_call": "argv",
             "sh": "script", "sandbox": "script", "nftdivert_argv": "nftdivert"}
SCRIPT_ARG = {"sh": 0, "sandbox": 1}  # ns.sh(script), sandbox(config, script, ...)
SHELL_WORDS = {"echo", "exit", "kill", "cd", "export", "exec", "set", "true", "false", "test", "[", "printf",
               "read", "wait", "trap", "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while",
               "until", "case", "esac", "return", "shift", "unset", ":", ".", "!"}
_BEFORE_COMMAND = {"do", "then", "else", "elif", "if", "while", "until", "!"}  # `do mkdir ...`
_SHELL_SPLIT = re.compile(r"&&|\|\||[;|&\n(){}]|\$\(|`")


def shell_programs(script: str) -> set[str]:
    found = set()
    script = re.sub(r"'[^']*'", "''", script)  # single-quoted: data (such as `python3 -c '...'`)
    for part in _SHELL_SPLIT.split(script):
        words = [w for w in part.split() if not re.match(r"\w+=", w)]
        while words and words[0] in _BEFORE_COMMAND:
            words.pop(0)
        if words and words[0] not in SHELL_WORDS and re.fullmatch(r"[\w.+-]+", words[0]):
            found.add(words[0])
    return found


def argv_programs(argv: list[str | None]) -> set[str]:
    """The programs an argv runs, through the wrappers; None is a word not known statically."""
    if not argv or argv[0] is None:
        return set()
    prog, rest = argv[0], argv[1:]
    if prog == "nftdivert":  # ours; `sandbox [OPTS] -- CMD` runs CMD
        return argv_programs(rest[rest.index("--") + 1:]) if rest[:1] == ["sandbox"] and "--" in rest else set()
    found = {prog}
    if prog == "ip" and rest[:2] == ["netns", "exec"]:
        found |= argv_programs(rest[3:])
    elif prog in ("setpriv", "unshare"):
        i = 0
        while i < len(rest) and rest[i] is not None and rest[i].startswith("-"):
            i += 1
            if rest[i - 1] == "--":
                break
        found |= argv_programs(rest[i:])
    elif prog == "sh" and rest[:1] == ["-c"] and len(rest) > 1 and rest[1] is not None:
        found |= shell_programs(rest[1])
    return found


def _name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _word(node: ast.expr, names: dict[str, set[str]]) -> set[str] | None:
    """The strings `node` can be: a constant, a name bound to constants, an
    f-string of those, a lookup in a dict of them, or `which("x")`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.FormattedValue):
        return _word(node.value, names)
    if isinstance(node, ast.JoinedStr):
        parts = [_word(v, names) for v in node.values]
        return {"".join(p) for p in itertools.product(*parts)} if all(parts) else None
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
        values = [_word(v, names) for v in node.value.values]
        return set().union(*values) if values and all(values) else None
    if isinstance(node, ast.Call) and _name(node.func) == "which" and node.args:
        return _word(node.args[0], names)
    return None


def _bindings(tree: ast.AST) -> dict[str, set[str]]:
    """Names bound to known strings anywhere in a module (scopes merged)."""
    names: dict[str, set[str]] = {}

    def bind(target: ast.expr, value: ast.expr) -> None:
        words = _word(value, names)
        if isinstance(target, ast.Name) and words:
            names.setdefault(target.id, set()).update(words)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value)
        elif isinstance(node, ast.For) and isinstance(node.iter, (ast.Tuple, ast.List)):
            for item in node.iter.elts:
                if isinstance(node.target, ast.Tuple) and isinstance(item, ast.Tuple):
                    for target, value in zip(node.target.elts, item.elts):
                        bind(target, value)
                else:
                    bind(node.target, item)
    return names


def source_programs(text: str, positional: bool = True) -> set[str]:
    """Programs a module runs. `positional`: also `ns.run("prog", "arg", ...)`,
    the tests' Netns methods; in the package `run` also names functions that are no
    process, so there only argv lists count."""
    tree = ast.parse(text)
    names = _bindings(tree)
    found: set[str] = set()
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        kind = EXECUTORS.get(_name(call.func) or "")
        if kind is None or not call.args:
            continue
        first = call.args[0]
        if kind == "script":
            at = SCRIPT_ARG[_name(call.func)]
            for script in (_word(call.args[at], names) or ()) if len(call.args) > at else ():
                found |= shell_programs(script)
            continue
        is_list = isinstance(first, (ast.List, ast.Tuple))
        if kind == "argv" and not is_list and not (positional and isinstance(call.func, ast.Attribute)):
            continue  # a bare run("x") is some module's own helper
        words = [{"nftdivert"}] if kind == "nftdivert" else []
        for node in first.elts if is_list else call.args:
            if isinstance(node, ast.Starred):
                break
            words.append(_word(node, names))
        rest = [next(iter(w)) if w and len(w) == 1 else None for w in words[1:]]
        for prog in (words[0] or ()) if words else ():
            found |= argv_programs([prog, *rest])
    return found


def demo_programs() -> set[str]:
    """The shell commands `make demo` runs inside the sandbox."""
    makefile = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:.*?(?=^\S)", makefile + "\nend:", re.M | re.S)[0]
    return set().union(*(shell_programs(s) for s in re.findall(r"sh -c\s*\\?\s*'([^']*)'", demo)))


def all_programs() -> dict[str, set[str]]:
    """program -> the files that run it."""
    where: dict[str, set[str]] = {}
    for path in SOURCES:
        for prog in source_programs(path.read_text(), positional="tests" in path.relative_to(REPO).parts[:1]):
            where.setdefault(prog, set()).add(str(path.relative_to(REPO)))
    for prog in demo_programs():
        where.setdefault(prog, set()).add("Makefile (demo)")
    return where


def apt_packages() -> set[str]:
    m = re.search(r"^APT_PACKAGES\s*:?=((?:.*\\\n)*.*)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "APT_PACKAGES not found in the Makefile"
    return set(m[1].replace("\\\n", " ").split())


def test_every_program_run_is_in_the_table():
    where = all_programs()
    unknown = {prog: sorted(files) for prog, files in where.items() if prog not in PACKAGES}
    assert not unknown, f"add these to tests/programs.py (program -> Debian package): {unknown}"


def test_every_program_in_the_table_is_run():
    # Keeps the table honest, and shows the scan sees what it should.
    unused = set(PACKAGES) - set(all_programs())
    assert not unused, f"no source runs these any more: remove them from tests/programs.py: {sorted(unused)}"


def test_the_makefile_installs_every_package_of_the_table():
    apt = apt_packages()
    assert {"nftables", "iproute2"} <= apt  # the parse found the list
    absent = {prog: pkg for prog, pkg in PACKAGES.items() if pkg not in apt}
    assert not absent, f"add these packages to APT_PACKAGES in the Makefile: {absent}"


def test_the_scan_sees_through_wrappers_and_names():
    src = '''
for tool in ("iptables-nft", "ip6tables-nft"):
    ns.run(f"{tool}-save")
subprocess.run(["ip", "netns", "exec", name, "setpriv", "--reuid=1", "--", "tcpdump", "-r", p])
ns.run("unshare", "--mount", "sh", "-c", "set -e; for d in x; do mkdir -p d; done; nft -f -")
ns.sh("echo hi | nc -q1 host 1 && curl -s x")
subprocess.Popen(nftdivert_argv("sandbox", "-w", "x.pcap", "--", "sleep", "1"))
save = {"ipv4": "iptables-nft-restore", "ipv6": "ip6tables-nft-restore"}[family]
host.run(save, "--test")
ns.run(sys.executable, "-c", "print(1)")
asyncio.run(main())
'''
    assert source_programs(src) == {
        "iptables-nft-save", "ip6tables-nft-save", "ip", "setpriv", "tcpdump", "unshare", "sh", "mkdir",
        "nft", "nc", "curl", "sleep", "iptables-nft-restore", "ip6tables-nft-restore"}
