"""Chains of values in a captured graph: identity ops, scalar scales, sums, and head counts read from attention.

Shared by the site locator (``locate``) and the weights (``interventions.scales``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .families import Family
from .graph import IDENTITY_OPS, SDPA_OPS, SHAPE_OPS, SOFTMAX_OPS, ModuleIndex, is_op, tensor_val

aten = torch.ops.aten
_SCALAR_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.mul_.Tensor, aten.div_.Tensor}  # CTRL scales in place


def root(n: fx.Node) -> fx.Node:
    """Strip identity ops (dtype casts that are no-ops, dropout, clones)."""
    while is_op(n, IDENTITY_OPS):
        n = n.args[0]
    return n


def is_scalar_scale(n: fx.Node) -> bool:
    return is_op(n, _SCALAR_OPS) and not isinstance(n.args[1], fx.Node)


def is_sum_of(n: fx.Node, parts: list[fx.Node]) -> bool:
    """Whether ``n`` is exactly the sum of ``parts`` (each once), through identity ops and adds: false when an
    embedding LayerNorm, a token-type embedding or anything else sits between the embeddings and block 0."""
    want = sorted(root(p).name for p in parts)

    def leaves(x: fx.Node) -> list[str]:
        x = root(x)
        if x.name in want:
            return [x.name]
        if (is_op(x, {aten.add.Tensor, operator.add}) and len(x.args) == 2 and not x.kwargs
                and all(isinstance(a, fx.Node) for a in x.args)):
            return leaves(x.args[0]) + leaves(x.args[1])
        return [x.name]

    return sorted(leaves(n)) == want


def scale_of(n: fx.Node | None) -> float:
    """Product of the scalar multiplies/divides on the identity chain ending at ``n``."""
    scale = 1.0
    while n is not None and (is_op(n, IDENTITY_OPS) or is_scalar_scale(n)):
        if is_scalar_scale(n):
            c = float(n.args[1])
            scale = scale * c if is_op(n, {aten.mul.Tensor, aten.mul_.Tensor}) else scale / c
        n = n.args[0]
    return scale


def graph_heads(gm: fx.GraphModule, family: Family, layer: int = 0) -> tuple[int, int, int] | None:
    """``(n_heads, n_kv_heads, d_head)`` read from the attention op of block ``layer``.

    The config may carry attributes the model ignores (a GPT-2 config with a stray
    ``num_key_value_heads``); the graph does not. ``d_head`` is the query's last dim;
    heads are the per-token size over ``d_head`` at the narrowest point of the query / key
    chains (keys before GQA repetition). ``None`` when block ``layer`` has no single
    attention op.
    """
    ix = ModuleIndex(gm.graph)
    nodes = ix.nodes(family.block(layer, family.attn))
    sdpa = [n for n in nodes if is_op(n, SDPA_OPS)]
    soft = [n for n in nodes if is_op(n, SOFTMAX_OPS)]
    if len(sdpa) == 1:
        q, k = sdpa[0].args[:2]
    elif len(soft) == 1:
        qk = soft[0].args[0]
        while qk is not None and not is_op(qk, {aten.matmul.default, aten.bmm.default}):
            qk = qk.args[0] if qk.args and isinstance(qk.args[0], fx.Node) else None
        if qk is None:
            return None
        q, k = qk.args[:2]
    else:
        return None
    qv = tensor_val(q)
    if qv is None or qv.dim() < 3 or not isinstance(qv.shape[-1], int):
        return None
    d_head = int(qv.shape[-1])

    def heads(n: fx.Node) -> int | None:
        best = None
        while True:
            v = tensor_val(n)
            if v is not None and v.dim() >= 4:
                per = [d for d in v.shape[1:] if isinstance(d, int)]
                count = 1
                for d in per:
                    count *= d
                if count % d_head == 0:
                    best = count // d_head if best is None else min(best, count // d_head)
            if not (is_op(n, SHAPE_OPS) or is_scalar_scale(n)):
                return best
            n = n.args[0]

    n_heads, n_kv = heads(q), heads(k)
    if not n_heads or not n_kv:
        return None
    return n_heads, n_kv, d_head
