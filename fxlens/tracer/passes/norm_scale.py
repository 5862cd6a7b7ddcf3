"""A norm's TransformerLens sites: its scale and its normalised vector before the weight.

TransformerLens computes a norm as ``hook_normalized(x_hat) * w (+ b)`` with ``x_hat = x / hook_scale``
(RMSNorm) or ``(x - mean) / hook_scale`` (LayerNorm). In an HF graph the RMSNorm-style form
(an ``rsqrt`` multiplied into the input) already holds ``x_hat`` as a node
(:func:`normalized_node`); a fused ``layer_norm`` op is rewritten here into scale, ``x_hat`` and the
affine map so that both can be read or hooked (:func:`expose_norm`).
"""

from __future__ import annotations

import torch
from torch import fx

from ..graph import follow_identity, is_op

aten = torch.ops.aten


def ln_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm scale ``sqrt(var(x) + eps)`` over the last dim, ``[.., 1]``."""
    return (x.var(dim=-1, keepdim=True, unbiased=False) + eps).sqrt()


def ln_normalize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm's normalised vector ``(x - mean) / scale``, before weight and bias."""
    return (x - x.mean(dim=-1, keepdim=True)) / scale


def ln_affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm's elementwise affine map on the normalised vector."""
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def normalized_node(op: fx.Node) -> fx.Node | None:
    """For an ``rsqrt`` norm: the node holding ``x * rsqrt(..)`` (after no-op casts), before the weight.

    ``None`` unless exactly one user multiplies the ``rsqrt`` into a tensor.
    """
    muls = [u for u in op.users if is_op(u, {aten.mul.Tensor})
            and all(isinstance(a, fx.Node) for a in u.args) and op in u.args]
    return follow_identity(muls[0]) if len(muls) == 1 else None


def expose_norm(graph: fx.Graph, op: fx.Node) -> tuple[dict[str, fx.Node], fx.Node | None]:
    """Rewrite the norm around ``op`` (an ``rsqrt`` or ``layer_norm``) so its derived sites are nodes.

    Returns ``{site suffix: node}`` (``hook_scale``, and ``hook_normalized`` for ``layer_norm``;
    replacing a node's uses, as a hook does, changes everything downstream) and the node that
    replaces ``op`` when ``op`` was removed (else ``None``).
    """
    meta = op.meta.get("nn_module_stack", {})
    if op.target is aten.rsqrt.default:
        with graph.inserting_after(op):
            scale = graph.call_function(torch.reciprocal, (op,))
        with graph.inserting_after(scale):
            inv = graph.call_function(torch.reciprocal, (scale,))
        op.replace_all_uses_with(inv, delete_user_cb=lambda u: u is not scale)
        parts, out = {"hook_scale": scale}, None
    else:
        x, _shape, weight, bias, eps = (list(op.args) + [None, None, 1e-5])[:5]
        with graph.inserting_before(op):
            scale = graph.call_function(ln_scale, (x, eps))
            normalized = graph.call_function(ln_normalize, (x, scale))
            out = graph.call_function(ln_affine, (normalized, weight, bias))
        op.replace_all_uses_with(out)
        graph.erase_node(op)
        parts = {"hook_scale": scale, "hook_normalized": normalized}
    for n in (*parts.values(), out):
        if n is not None:
            n.meta["nn_module_stack"] = meta
    return parts, out
