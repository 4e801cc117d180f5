"""The package's shape: no import cycles (function-level imports count), one plan class, no module assigning into
another module's attributes.

An import edge A → B is every `import B`, `from B import name` (→ B.name when that is a module of the package,
else B) anywhere in A, at module or function level. The parent package a submodule import runs first is not an
edge of its own: `from fastdiff.ops import multistep` depends on fastdiff.ops.multistep (and, because fastdiff/ops
is a package whose __init__ runs, on fastdiff.ops), not on fastdiff/__init__.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fastdiff"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _package_of(mod: str, path: Path) -> str:
    return mod if path.name == "__init__.py" else mod.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = _package_of(mod, path).split(".")
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in mods else base)
            for t in targets:
                # the deepest module of the package the name lies in (import a.b.c depends on a.b.c)
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in fastdiff/: " + "; ".join(" ↔ ".join(c) for c in found)


def test_one_plan_class():
    """Every sampler compiles to fastdiff.samplers.plan.SolverPlan: no second plan dataclass in the package."""
    names = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Plan"):
                names.append(f"{path.relative_to(ROOT.parent)}:{node.name}")
    assert len(names) == 1, names


def test_no_module_assigns_into_another_modules_attributes():
    """No `module.name = value` on a fastdiff module bound by an import (run-time patching of another module's
    functions or globals)."""
    mods = _modules()
    bad = []
    for path in mods.values():
        tree = ast.parse(path.read_text())
        bound = set()  # local names of fastdiff modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("fastdiff")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastdiff"):
                bound |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in mods}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in bound:
                        bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {t.value.id}.{t.attr}")
    assert not bad, bad
