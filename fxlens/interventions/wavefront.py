"""Per-block entry points cut from the captured graph, and the wavefront sweep schedule.

A patching sweep over layers wastes most of its time re-running the unpatched prefix:
a variant patched at block ``k`` equals the corrupted run up to block ``k``. The graph is
cut at the residual stream into one segment per block, ``(input_ids, attention_mask,
resid) -> resid``, plus a head ``(ids, mask, resid) -> logits``. The wavefront makes one
pass over the blocks: variants patched in block ``k`` join the batch there, starting from
the corrupted run's cached ``resid_pre`` (patched directly for ``resid_pre``/``resid_post``
cells, through a hook inside the block otherwise), so the weights stream once for the
whole sweep and only the positions the metric reads are unembedded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

from ..hooks import FixedHooks, HookFn, HookPoint, calling, check_result
from ..tracer.graph import dead_code, module_path
from ..tracer.sites import layer_of
from ..tracer.specialise import Request


class Segments:
    """The graph cut into per-block segments, with hooks at ``hooked`` sites.

    Args:
        model: the :class:`~fxlens.HookedModel`.
        hooked: sites inside blocks whose hook calls the segments keep.
        compile: wrap each segment in ``torch.compile`` (dynamic shapes: the batch grows as cells join).
    """

    def __init__(self, model, hooked: frozenset[str], compile: bool = False):
        sites, n = model.sites, model.cfg.n_layers
        self.hooked = hooked
        for name in ("hook_embed", *(f"blocks.{L}.hook_{w}" for L in range(n) for w in ("resid_pre", "resid_post"))):
            if sites[name].layout != "same":
                raise ValueError(f"{name} is not a [batch, pos, d_model] node in this graph; use schedule='batched'")
        gm = model.specialised(Request(hooks=hooked)) if hooked else model.base_graph
        self.blocks = [self._cut(model, gm, sites[f"blocks.{L}.hook_resid_pre"].node,
                                 sites[f"blocks.{L}.hook_resid_post"].node, L) for L in range(n)]
        self.head = self._cut(model, gm, sites[f"blocks.{n - 1}.hook_resid_post"].node, None, None)
        if compile:
            self.blocks = [torch.compile(b, dynamic=True) for b in self.blocks]
            self.head = torch.compile(self.head, dynamic=True)

    @staticmethod
    def _cut(model, gm: fx.GraphModule, start: str, end: str | None, layer: int | None) -> fx.GraphModule:
        g = fx.Graph()
        out = g.graph_copy(gm.graph, {})
        nodes = {n.name: n for n in g.nodes}
        last_placeholder = [n for n in g.nodes if n.op == "placeholder"][-1]
        with g.inserting_after(last_placeholder):
            resid = g.placeholder("resid_in")
        logits = out[0] if isinstance(out, (tuple, list)) else out
        target = nodes[end] if end is not None else logits
        old = nodes[start]
        old.replace_all_uses_with(resid)
        g.output(target)
        dead_code(g)
        fam = model.family
        for node in g.nodes:
            path = module_path(node)
            if node.op != "call_function" or not path:
                continue
            inside_other = path.startswith(fam.layers + ".") and (
                layer is None or not (path == fam.block(layer, "") or path.startswith(fam.block(layer, "") + ".")))
            if inside_other or path == fam.embed or path.startswith(fam.embed + "."):
                raise ValueError(f"cannot cut the graph at block {layer}: {node.name} ({path}) is needed from "
                                 "outside the block; use schedule='batched'")
        g.lint()
        return fx.GraphModule(gm, g)


@dataclass
class Cell:
    """One variant: patch ``site`` (region ``mask`` over the site's dims) with ``op``."""

    site: str
    mask: torch.Tensor | None
    op: Callable[[torch.Tensor, HookPoint], torch.Tensor]

    @property
    def join(self) -> int:
        """Block before which the variant joins the batch (``n_layers`` = before the head)."""
        L = layer_of(self.site)
        return L + 1 if self.site.endswith("hook_resid_post") else L

    @property
    def direct(self) -> bool:
        """Patched on the residual stream itself (no hook inside the block)."""
        return self.site.endswith(("hook_resid_pre", "hook_resid_post"))


def apply_cell(cell: Cell, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the cell's region replaced by ``cell.op(x)``."""
    new = cell.op(x, HookPoint(cell.site)).to(x.dtype).expand_as(x)
    return new.clone() if cell.mask is None else torch.where(cell.mask, new, x)


class GroupHooks:
    """Hooks applied per ``b``-row group: the model's active hooks (``user``), then each group's cell.

    Every group is one variant of a ``b``-row batch, so a user hook sees exactly the tensor it sees
    in a one-forward-per-cell loop (batch statistics included).
    """

    def __init__(self, model, user: dict[str, list[HookFn]], b: int):
        self.model, self.user, self.b = model, user, b
        self.cells: dict[str, list[tuple[int, Cell]]] = {}

    def place(self, group: int, cell: Cell) -> None:
        self.cells.setdefault(cell.site, []).append((group, cell))

    def apply(self, site: str, x: torch.Tensor, cells: bool = True) -> torch.Tensor:
        fns, mine = self.user.get(site, ()), self.cells.get(site, ()) if cells else ()
        if not fns and not mine:
            return x
        x, b = x.clone(), self.b
        if fns:
            point = self.model.hook_point(site)
            for g in range(x.shape[0] // b):
                y = x[g * b:(g + 1) * b]
                for fn in fns:
                    y = check_result(fn, site, y, fn(y, hook=point))
                x[g * b:(g + 1) * b] = y
        for group, cell in mine:
            sl = slice(group * b, (group + 1) * b)
            x[sl] = apply_cell(cell, x[sl])
        return x

    def call(self, sites) -> FixedHooks:
        """A hook call that runs :meth:`apply` at ``sites`` inside a graph."""
        return FixedHooks({s: [lambda x, hook: self.apply(hook.name, x)] for s in sites})


def run_wavefront(model, segments: Segments, cells: list[Cell], ids: torch.Tensor, mask: torch.Tensor,
                  corrupt, keep_pos: torch.Tensor, user: dict[str, list[HookFn]]) -> torch.Tensor:
    """Logits ``[len(cells) * batch, len(keep_pos), vocab]`` of the patched variants, in ``cells`` order.

    ``corrupt`` is the corrupted run's cache (every ``resid_pre`` and ``resid_post``, taken after
    the active hooks); ``user`` the active hooks ``{site: [fn]}``, applied per variant.
    """
    b, n = ids.shape[0], model.cfg.n_layers
    order = sorted(range(len(cells)), key=lambda i: cells[i].join)
    rows: torch.Tensor | None = None
    placed: list[int] = []  # cell index of each b-row group, in batch order
    hooks = GroupHooks(model, user, b)
    pre, post = "blocks.{}.hook_resid_pre", "blocks.{}.hook_resid_post"

    def entry(cell: Cell, k: int) -> torch.Tensor:
        if cell.site.endswith("hook_resid_post"):  # joins at k = L + 1; resid_pre k's hooks still run
            x = apply_cell(cell, corrupt[post.format(k - 1)])
            return hooks.apply(pre.format(k), x, cells=False) if k < n else x
        base = corrupt[pre.format(k)]
        return apply_cell(cell, base) if cell.direct else base

    start = min(c.join for c in cells)
    with torch.no_grad(), calling(hooks.call(segments.hooked)):
        for k in range(start, n + 1):
            new = [i for i in order if cells[i].join == k]
            if new:  # hooks of block-k sites only run in segment k: state needs no reset
                rows = torch.cat(([rows] if rows is not None else []) + [entry(cells[i], k) for i in new])
                for i in new:
                    if not cells[i].direct:
                        hooks.place(len(placed), cells[i])
                    placed.append(i)
            if k < n:
                groups = len(placed)
                rows = segments.blocks[k](ids.repeat(groups, 1), mask.repeat(groups, 1), rows)
                rows = hooks.apply(post.format(k), rows, cells=False)
                if k + 1 < n:
                    rows = hooks.apply(pre.format(k + 1), rows, cells=False)
        groups = len(placed)
        if any(s.startswith("ln_final") for s in user):  # position-dependent hooks need every position
            logits = segments.head(ids.repeat(groups, 1), mask.repeat(groups, 1), rows)[:, keep_pos]
        else:
            logits = segments.head(ids[:, keep_pos].repeat(groups, 1), mask[:, keep_pos].repeat(groups, 1),
                                   rows[:, keep_pos])
    inverse = torch.empty(len(cells), dtype=torch.long)
    inverse[torch.tensor(placed)] = torch.arange(len(placed))
    return logits.unflatten(0, (len(placed), b))[inverse].flatten(0, 1)
