"""Run a script's ``# [N]`` cells as a notebook would (for the Main Demo port in this folder)."""

from __future__ import annotations

import ast
import contextlib
import io
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path


class Notebook:
    """Runs a script's ``# [N]`` cells in one namespace, like a notebook: each cell's stdout, error,
    time and displayed value (a last bare expression) are recorded, and an error does not stop later cells."""

    def __init__(self, path: Path):
        self.path = path
        self.ns: dict = {"__name__": "main_demo_port", "__file__": str(path)}
        self.stdout: dict[int, str] = {}
        self.errors: dict[int, str] = {}
        self.seconds: dict[int, float] = {}
        self.out: dict[int, object] = {}
        self.after: dict[int, dict] = {}  # selected variables as they stood right after a cell

    def cells(self) -> list[tuple[int, int, str]]:
        lines = self.path.read_text().splitlines(keepends=True)
        starts = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := re.match(r"# \[(\d+)\]$", line))]
        ends = [i for i, _ in starts[1:]] + [len(lines)]
        return [(n, i, "".join(lines[i:end])) for (i, n), end in zip(starts, ends)]

    def run(self, keep: dict[int, tuple[str, ...]] | None = None, log: Callable[[str], None] | None = None) -> Notebook:
        keep = keep or {}
        for n, first, src in self.cells():
            tree = ast.parse("\n" * first + src, str(self.path))  # line numbers as in the file
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            buf, t0 = io.StringIO(), time.perf_counter()
            try:
                with contextlib.redirect_stdout(buf):
                    exec(compile(tree, str(self.path), "exec"), self.ns)
                    if last is not None:
                        self.out[n] = eval(compile(ast.Expression(last.value), str(self.path), "eval"), self.ns)
            except Exception:
                self.errors[n] = traceback.format_exc()
            self.seconds[n] = time.perf_counter() - t0
            self.stdout[n] = buf.getvalue()
            self.after[n] = {k: self.ns[k] for k in keep.get(n, ()) if k in self.ns}
            if log is not None:
                log(f"[{n}] {self.seconds[n]:.1f}s{' raised' if n in self.errors else ''}")
        return self

    def ok(self, *cells: int) -> None:
        """Fail with the cell's traceback if any of ``cells`` raised."""
        bad = {n: self.errors[n] for n in cells if n in self.errors}
        assert not bad, "\n".join(f"cell [{n}] raised:\n{e}" for n, e in bad.items())

    def printed(self, n: int) -> list[str]:
        return self.stdout[n].splitlines()
