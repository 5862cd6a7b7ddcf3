"""fxlens' modules import each other without cycles, function-level imports included.

Every ``import`` / ``from ... import`` statement anywhere in a module (top level, inside functions,
methods or ``try`` blocks) is an edge: a function-level import hides a cycle from Python's loader,
not from the design. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
to ``pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fxlens

ROOT = Path(fxlens.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package at ``root``."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [root.name, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_edges(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}, from every import statement in the file."""
    files = module_files(root)
    edges: dict[str, dict[str, int]] = {}
    for mod, f in files.items():
        here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        out = edges.setdefault(mod, {})
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[:len(here) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files and "." in t:  # `import fxlens.a.b` names fxlens.a.b
                    t = t.rsplit(".", 1)[0]
                if t in files and t != mod:
                    out.setdefault(t, node.lineno)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _describe(edges: dict[str, dict[str, int]], comp: list[str]) -> str:
    inside = set(comp)
    return "; ".join(f"{a} -> {b} (line {line})" for a in comp for b, line in sorted(edges[a].items())
                     if b in inside)


def test_finder_sees_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n    return x\n")
    (pkg / "c.py").write_text("import pkg.sub.b\n")
    edges = import_edges(pkg)
    assert edges["pkg.a"] == {"pkg.sub.b": 1}
    assert edges["pkg.sub.b"] == {"pkg.a": 2}
    assert edges["pkg.c"] == {"pkg.sub.b": 1}
    assert cycles(edges) == [["pkg.a", "pkg.sub.b"]]


def test_finder_reads_fxlens():
    edges = import_edges(ROOT)
    assert len(edges) == len(module_files(ROOT)) > 60
    assert "fxlens.tracer.sites" in edges["fxlens.interventions.patches"]  # a top-level relative import
    assert "fxlens.interventions.generate" in edges["fxlens.model"]  # a function-level one


def test_no_import_cycles():
    edges = import_edges(ROOT)
    found = cycles(edges)
    assert not found, "import cycles: " + " | ".join(_describe(edges, c) for c in found)


def test_tracer_does_not_import_above_it():
    """The tracer (capture, sites, graph passes) is the bottom layer: it uses no interventions, lenses,
    loading, model or CLI code (only ``fxlens.hooks``, which runs a hook in a specialised graph)."""
    edges = import_edges(ROOT)
    allowed = {"fxlens.hooks", "fxlens._version", "fxlens.storage"}
    bad = {f"{a} -> {b} (line {line})" for a, targets in edges.items() if a.startswith("fxlens.tracer")
           for b, line in targets.items() if not b.startswith("fxlens.tracer") and b not in allowed}
    assert not bad, sorted(bad)


def test_one_version():
    from fxlens import _version

    assert fxlens.__version__ == _version.__version__
