"""Expose a norm's scale (``sqrt(var + eps)`` or ``sqrt(mean(x^2) + eps)``) as a node."""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def ln_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm scale ``sqrt(var(x) + eps)`` over the last dim, ``[.., 1]``."""
    return (x.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()


def ln_apply(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor | None,
             bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm output given its scale."""
    y = (x - x.mean(dim=-1, keepdim=True)) / scale
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def expose_scale(graph: fx.Graph, op: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """Rewrite the norm around ``op`` (an ``rsqrt`` or ``layer_norm``) to read a scale node.

    Returns the scale node (replacing its uses, as a hook does, changes the norm's
    output) and the node that replaces ``op`` when ``op`` was removed (else ``None``).
    """
    meta = op.meta.get("nn_module_stack", {})
    if op.target is aten.rsqrt.default:
        with graph.inserting_after(op):
            scale = graph.call_function(torch.reciprocal, (op,))
        with graph.inserting_after(scale):
            inv = graph.call_function(torch.reciprocal, (scale,))
        op.replace_all_uses_with(inv, delete_user_cb=lambda u: u is not scale)
        out = None
    else:
        x, _shape, weight, bias, eps = (list(op.args) + [None, None, 1e-5])[:5]
        with graph.inserting_before(op):
            scale = graph.call_function(ln_scale, (x, eps))
            out = graph.call_function(ln_apply, (x, scale, weight, bias))
        op.replace_all_uses_with(out)
        graph.erase_node(op)
        out.meta["nn_module_stack"] = meta
    scale.meta["nn_module_stack"] = meta
    return scale, out
