"""Every field a conversation-log record can carry, read from the code that builds the records.

No schema module lists them: the records are dicts built where they happen
(`dict(base, event="tls", ...)`, `{"v": SCHEMA, "event": "start", ...}`,
`record["sni"] = ...`, `**body.finish()`). So this reads the builders'
syntax (ast) in nftdivert/services, nftdivert/observers and runner.py, and
follows what a builder splats in: a function's returned dict, a local
dict's stores, a parameter's arguments at its callers, a `**fields`
parameter's keywords. It over-approximates (a helper's dict that never
reaches a record would count); it never runs the code.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ("nftdivert/services/*.py", "nftdivert/observers/*.py", "nftdivert/runner.py")
RECORD_VARS = {"rec", "record", "base"}  # what the builders call a record they add to
FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)


def _tail(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _str(node):
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_record_var(node) -> bool:
    name = _tail(node)
    return name is not None and name.lstrip("_") in RECORD_VARS


class _Code:
    def __init__(self) -> None:
        files = sorted(p for pattern in SOURCES for p in ROOT.glob(pattern))
        self.trees = {f: ast.parse(f.read_text()) for f in files}
        self.owner: dict[ast.AST, ast.AST] = {}  # node -> its innermost function
        self.file_of: dict[ast.AST, pathlib.Path] = {}
        self.funcs: dict[str, list] = {}
        self.calls: list[ast.Call] = []
        for f, tree in self.trees.items():
            for node in ast.walk(tree):
                self.file_of[node] = f
                if isinstance(node, FUNC):
                    self.funcs.setdefault(node.name, []).append(node)
                    for inner in ast.walk(node):
                        if inner is not node:
                            self.owner[inner] = node  # ast.walk goes outer first: the innermost wins
                if isinstance(node, ast.Call) and _tail(node.func):
                    self.calls.append(node)
        self.memo: dict = {}

    def targets(self, call: ast.Call) -> list:
        """The functions a call may reach: by name, in the caller's module first, `module.f` in that module."""
        name, here = _tail(call.func), self.file_of[call]
        defs = self.funcs.get(name, [])
        if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name):
            in_module = [d for d in defs if self.file_of[d].stem == call.func.value.id]
            if in_module:
                return in_module
        local = [d for d in defs if self.file_of[d] == here]
        return local or defs

    def _memo(self, key, compute):
        if key not in self.memo:
            self.memo[key] = set()  # in progress: a cycle adds nothing
            self.memo[key] = compute()
        return self.memo[key]

    def keys_of(self, e, fn) -> set[str]:
        """The keys a dict-valued expression inside function `fn` can carry."""
        keys: set[str] = set()
        if isinstance(e, ast.Dict):
            for k, v in zip(e.keys, e.values):
                keys |= self.keys_of(v, fn) if k is None else {_str(k)} - {None}
        elif isinstance(e, ast.IfExp):
            keys |= self.keys_of(e.body, fn) | self.keys_of(e.orelse, fn)
        elif isinstance(e, ast.BoolOp):
            for v in e.values:
                keys |= self.keys_of(v, fn)
        elif isinstance(e, ast.Call) and _tail(e.func) == "dict":
            for a in e.args:
                keys |= self.keys_of(a, fn)
            for kw in e.keywords:
                keys |= {kw.arg} if kw.arg else self.keys_of(kw.value, fn)
        elif isinstance(e, ast.Call):
            for target in self.targets(e):
                keys |= self.returned(target)
        elif isinstance(e, ast.Name) and fn is not None:
            keys |= self.name_keys(e.id, fn)
        return keys

    def returned(self, fn, index: int | None = None) -> set[str]:
        """The keys of the dicts `fn` returns (or of item `index` of the tuples it returns)."""
        def compute():
            keys: set[str] = set()
            for node in ast.walk(fn):
                if isinstance(node, ast.Return) and node.value is not None and self.owner.get(node) is fn:
                    value = node.value
                    if index is not None:
                        if not (isinstance(value, ast.Tuple) and len(value.elts) > index):
                            continue
                        value = value.elts[index]
                    keys |= self.keys_of(value, fn)
            return keys
        return self._memo(("returned", fn, index), compute)

    def stores(self, fn, name: str) -> set[str]:
        """Keys put into the dict `name` in fn: name["k"] = ..., name.update(...), name.setdefault("k", ...)."""
        keys: set[str] = set()
        for node in ast.walk(fn):
            for target in _assigned(node):
                if isinstance(target, ast.Subscript) and _tail(target.value) == name and _str(target.slice):
                    keys.add(_str(target.slice))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _tail(node.func.value) == name:
                keys |= self.added(node, fn)
        return keys

    def added(self, call: ast.Call, fn) -> set[str]:
        """What `x.update(...)` or `x.setdefault("k", ...)` adds."""
        if call.func.attr == "update":
            keys = {kw.arg for kw in call.keywords if kw.arg}
            for a in call.args:
                keys |= self.keys_of(a, fn)
            return keys
        if call.func.attr == "setdefault" and call.args and _str(call.args[0]):
            return {_str(call.args[0])}
        return set()

    def name_keys(self, name: str, fn) -> set[str]:
        def compute():
            keys = self.stores(fn, name)
            for node in ast.walk(fn):
                if self.owner.get(node) is not fn:
                    continue
                value = getattr(node, "value", None)
                for target in _assigned(node):
                    if isinstance(target, ast.Name) and target.id == name and value is not None:
                        keys |= self.keys_of(value, fn)
                    elif isinstance(target, ast.Tuple) and isinstance(value, ast.Call):
                        for i, item in enumerate(target.elts):
                            if isinstance(item, ast.Name) and item.id == name:
                                for called in self.targets(value):
                                    keys |= self.returned(called, i)
            return keys | self.from_callers(name, fn)
        return self._memo(("name", fn, name), compute)

    def from_callers(self, name: str, fn) -> set[str]:
        """A parameter's keys: what the callers pass (a `**fields` parameter: their keywords)."""
        args = fn.args
        positional = [a.arg for a in args.posonlyargs + args.args]
        keys: set[str] = set()
        callers = [c for c in self.calls if _tail(c.func) == fn.name and fn in self.targets(c)]
        for call in callers:
            where = self.owner.get(call)
            if args.kwarg is not None and args.kwarg.arg == name:
                for kw in call.keywords:
                    keys |= {kw.arg} if kw.arg else self.keys_of(kw.value, where)
            elif name in positional:
                i = positional.index(name)
                if positional[0] == "self" and isinstance(call.func, ast.Attribute):
                    i -= 1
                given = [kw.value for kw in call.keywords if kw.arg == name]
                given += [call.args[i]] if 0 <= i < len(call.args) else []
                for value in given:
                    keys |= self.keys_of(value, where)
        return keys


def _assigned(node) -> list:
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.AnnAssign, ast.NamedExpr)):
        return [node.target]
    return []


def _is_builder(node) -> bool:
    """A dict that is a record: it names its `event` (or is a listener's base, with `client`)."""
    if isinstance(node, ast.Dict):
        return any(_str(k) in ("event", "client") for k in node.keys if k is not None)
    if isinstance(node, ast.Call) and _tail(node.func) == "dict":
        return any(kw.arg == "event" for kw in node.keywords) or bool(node.args and _is_record_var(node.args[0]))
    return False


def record_fields() -> dict[str, set[str]]:
    """field -> where a record gets it ("path:line")."""
    code = _Code()
    found: dict[str, set[str]] = {}
    for f, tree in code.trees.items():
        for node in ast.walk(tree):
            fn = code.owner.get(node)
            keys: set[str] = set()
            if _is_builder(node):
                keys = code.keys_of(node, fn)
            for target in _assigned(node):
                if isinstance(target, ast.Subscript) and _is_record_var(target.value) and _str(target.slice):
                    keys.add(_str(target.slice))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_record_var(node.func.value):
                keys |= code.added(node, fn)
            for key in keys:
                found.setdefault(key, set()).add(f"{f.relative_to(ROOT)}:{node.lineno}")
    return found


def record_events() -> set[str]:
    """Every `event` a record names: the constants given as event= or "event": ..."""
    events: set[str] = set()
    for f in sorted(p for pattern in SOURCES for p in ROOT.glob(pattern)):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "event" and _str(node.value):
                events.add(_str(node.value))
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if k is not None and _str(k) == "event" and _str(v):
                        events.add(_str(v))
    return events
