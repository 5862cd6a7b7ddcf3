"""One graph for every cache-only signature of plain sites: taps record the sites a call asks for.

A specialised graph costs a graph copy and Python code generation (~40 ms on a tiny model,
far more on a real one) and torch.fx keeps its source until it is released. A request that
only caches sites already in the captured graph (no hooks, no derived sites, no
``stop_at_layer``) needs no graph of its own: the tap graph is the captured graph plus one
side-effect call after each such site's node, which keeps a reference to the tensor when the
running call asked for it. The values are the same tensors a specialised graph would return.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextvars import ContextVar

import torch
from torch import fx

from .graph import getattr_path
from .sites import Site
from .specialise import split_heads, swap_head_pos, unflatten_rows

#: (sites the running call caches, where their tensors go); per thread / task.
_TAPPED: ContextVar[tuple[frozenset[str], dict[str, torch.Tensor]] | None] = ContextVar("fxlens_taps", default=None)


def tap(name: str, x: torch.Tensor) -> None:
    """Record ``x`` as site ``name`` if the running call caches it."""
    call = _TAPPED.get()
    if call is not None and name in call[0]:
        call[1][name] = x


fx.node.has_side_effect(tap)  # kept by dead-code elimination


def tappable(site: Site) -> bool:
    """Whether a site's value is a node of the captured graph (no pass has to create it)."""
    return site.derive is None


def build_tap_graph(base: fx.GraphModule, sites: dict[str, Site]) -> fx.GraphModule:
    """The captured graph with a :func:`tap` after the node of every tappable site."""
    graph = fx.Graph()
    out = graph.graph_copy(base.graph, {})
    nodes = {n.name: n for n in graph.nodes}
    for name, site in sites.items():
        if tappable(site):
            x = nodes[site.node]
            with graph.inserting_after(x):
                graph.call_function(tap, (name, x))
    graph.output(out)
    root = {n.target: getattr_path(base, n.target) for n in graph.nodes if n.op == "get_attr"}
    return fx.GraphModule(root, graph, class_name="TappedModel")


class TapRun:
    """``(input_ids, attention_mask) -> (out, *cached)`` for ``names`` through the tap graph."""

    def __init__(self, graph: fx.GraphModule, sites: dict[str, Site], names: Iterable[str]):
        self.graph, self.names = graph, tuple(names)
        self._layouts = [(n, sites[n].layout, sites[n].extra.get("heads")) for n in self.names]

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        store: dict[str, torch.Tensor] = {}
        token = _TAPPED.set((frozenset(self.names), store))
        try:
            out = self.graph(input_ids, attention_mask)
        finally:
            _TAPPED.reset(token)
        return (out, *(_present(store[n], layout, heads, input_ids) for n, layout, heads in self._layouts))


def _present(x: torch.Tensor, layout: str, heads: int | None, ids: torch.Tensor) -> torch.Tensor:
    """The site's shape from its node's tensor (the views a specialised graph inserts)."""
    if layout == "heads":
        return split_heads(x, heads)
    if layout == "bhsd":
        return swap_head_pos(x)
    if layout == "flat":
        return unflatten_rows(x, ids)
    return x
