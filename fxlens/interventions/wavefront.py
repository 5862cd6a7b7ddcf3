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

from ..tracer.graph import SDPA_OPS, is_op, module_path
from ..tracer.sites import layer_of
from ..tracer.specialise import Request
from .hooks import HookPoint, HookRegistry, active


class Segments:
    """The graph cut into per-block segments, with hooks at ``hooked`` sites.

    Args:
        model: the :class:`~fxlens.HookedModel`.
        hooked: sites inside blocks whose hook calls the segments keep.
        compile: wrap each segment in ``torch.compile`` (dynamic shapes: the batch grows as cells join).
    """

    def __init__(self, model, hooked: frozenset[str], compile: bool = False):
        sites, n = model._sites, model.cfg.n_layers
        self.hooked = hooked
        for name in ("hook_embed", *(f"blocks.{L}.hook_{w}" for L in range(n) for w in ("resid_pre", "resid_post"))):
            if sites[name].layout != "same":
                raise ValueError(f"{name} is not a [batch, pos, d_model] node in this graph; use schedule='batched'")
        gm = model._specialise(Request(hooks=hooked)) if hooked else model._base
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
        _dead_code(g)
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


def _dead_code(g: fx.Graph) -> None:
    """Dead-code elimination that also drops unused SDPA calls (fx counts them impure: dropout RNG)."""
    for node in reversed(list(g.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if not node.is_impure() or is_op(node, SDPA_OPS):
            g.erase_node(node)


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


def run_wavefront(model, segments: Segments, cells: list[Cell], ids: torch.Tensor, mask: torch.Tensor,
                  resid: dict[int, torch.Tensor], keep_pos: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(cells) * batch, len(keep_pos), vocab]`` of the patched variants, in ``cells`` order.

    ``resid[k]`` is the corrupted run's residual stream entering block ``k`` (``k = n_layers``:
    after the last block).
    """
    b, n = ids.shape[0], model.cfg.n_layers
    order = sorted(range(len(cells)), key=lambda i: cells[i].join)
    rows: torch.Tensor | None = None
    placed: list[int] = []  # cell index of each b-row group, in batch order
    registry = HookRegistry()
    state: dict[str, list[tuple[int, Cell]]] = {}

    def hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        for group, cell in state.get(hook.name, ()):
            sl = slice(group * b, (group + 1) * b)
            x[sl] = apply_cell(cell, x[sl])
        return x

    for site in segments.hooked:
        registry.add(site, hook, temporary=False)
    start = min(c.join for c in cells)
    with torch.no_grad(), active(registry):
        for k in range(start, n + 1):
            new = [i for i in order if cells[i].join == k]
            if new:  # hooks of block-k sites only run in segment k: state needs no reset
                base = resid[k]
                add = [apply_cell(cells[i], base) if cells[i].direct else base for i in new]
                rows = torch.cat(([rows] if rows is not None else []) + add)
                for i in new:
                    if not cells[i].direct:
                        state.setdefault(cells[i].site, []).append((len(placed), cells[i]))
                    placed.append(i)
            if k < n:
                groups = len(placed)
                rows = segments.blocks[k](ids.repeat(groups, 1), mask.repeat(groups, 1), rows)
        groups = len(placed)
        logits = segments.head(ids[:, keep_pos].repeat(groups, 1), mask[:, keep_pos].repeat(groups, 1),
                               rows[:, keep_pos])
    inverse = torch.empty(len(cells), dtype=torch.long)
    inverse[torch.tensor(placed)] = torch.arange(len(placed))
    return logits.unflatten(0, (len(placed), b))[inverse].flatten(0, 1)
