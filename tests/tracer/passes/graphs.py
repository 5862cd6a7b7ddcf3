"""Helpers for pass tests: copy a traced model's captured graph, run it, count its nodes, HF references."""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fxlens.tracer.graph import getattr_path


def copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[str, fx.Node]]:
    """A copy of ``gm``'s graph (same outputs) and its nodes by name."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return graph, {n.name: n for n in graph.nodes}


def module(gm: fx.GraphModule, graph: fx.Graph, extra: dict | None = None) -> fx.GraphModule:
    """A runnable module for ``graph`` over ``gm``'s parameters (plus ``extra`` attributes)."""
    root = {n.target: getattr_path(gm, n.target) for n in graph.nodes
            if n.op == "get_attr" and n.target not in (extra or {})}
    root.update(extra or {})
    graph.lint()
    return fx.GraphModule(root, graph)


def count(graph: fx.Graph, *targets) -> int:
    """Nodes calling any of ``targets`` (ops, functions or module paths)."""
    return sum(1 for n in graph.nodes if n.target in targets)


def targets(graph: fx.Graph) -> Counter:
    """How many nodes call each target (placeholders and outputs included)."""
    return Counter(n.target for n in graph.nodes)


def first(out):
    """The main output of a graph that returns a tensor or ``(out, *cached)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def hf_logits(m, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """The eager HF model's output for ``ids`` (logits, or the last hidden state for encoders)."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = m.hf_model(input_ids=ids, attention_mask=mask, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def add_outputs(graph: fx.Graph, *nodes: fx.Node) -> None:
    """Make ``graph`` return ``(out, *nodes)``."""
    out = next(n for n in graph.nodes if n.op == "output")
    main = out.args[0]
    out.args = (((main,) if isinstance(main, fx.Node) else tuple(main)) + nodes,)
