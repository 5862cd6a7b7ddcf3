"""Scalars a model applies outside its modules, read from the captured graph (and one module probe).

The stacked weights include them, so they are what the sites imply (see ``weights``): Granite's
``embedding_multiplier`` / ``residual_multiplier`` / ``logits_scaling``, Cohere's ``logit_scale``,
Gemma's embedding ``sqrt(d_model)``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..tracer.graph import IDENTITY_OPS, SHAPE_OPS, ModuleIndex, is_op


def site_scale(sites: dict, name: str, post_norm: str | None) -> float:
    """The scalar multiplier the locator found between a module and its site (1 after a post-norm)."""
    site = sites.get(name)
    return 1.0 if site is None or post_norm else float(site.extra.get("scale", 1.0))



def _scalar_factor(node: fx.Node, arg: fx.Node) -> float | None:
    """The factor ``node`` multiplies ``arg`` by, when it is an identity op or a scalar mul/div of it."""
    if is_op(node, IDENTITY_OPS) and node.args[0] is arg:
        return 1.0
    aten = torch.ops.aten
    if is_op(node, {aten.mul.Tensor, aten.div.Tensor, aten.mul_.Tensor, aten.div_.Tensor}) and node.args[0] is arg \
            and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool):
        c = float(node.args[1])
        return c if node.target in (aten.mul.Tensor, aten.mul_.Tensor) else 1.0 / c
    return None


def logit_scale(gm: fx.GraphModule, hf: nn.Module) -> float:
    """The scalar the graph multiplies the LM head's output by on its way to the returned logits
    (Granite's ``1 / logits_scaling``, Cohere's ``logit_scale``); 1 when a non-linear op (soft-cap) follows."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    path = next((n for n, m in hf.named_modules() if m is head), None) if head is not None else None
    if not path:
        return 1.0
    out = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(out.all_input_nodes)
    for node in ModuleIndex(gm.graph).outputs(path):
        scale = 1.0
        while node not in returned and len(node.users) == 1:
            (user,) = node.users
            c = _scalar_factor(user, node)
            if c is None:
                break
            scale, node = scale * c, user
        if node in returned:
            return scale
    return 1.0


def embedding_scale(module: nn.Module) -> float:
    """The scalar an embedding module multiplies its table rows by (Gemma's ``embed_scale``; 1 for
    ``nn.Embedding``), probed on a few ids; raises when its output is not a scaled lookup."""
    if type(module) is nn.Embedding:
        return 1.0
    w = module.weight
    ids = torch.arange(min(16, w.shape[0]), device=w.device)
    with torch.no_grad():
        out, rows = module(ids).double(), w[ids].double()
    c = float((out * rows).sum() / rows.pow(2).sum().clamp_min(1e-30))
    if out.shape != rows.shape or not torch.allclose(out, c * rows, rtol=1e-3, atol=1e-6):
        raise ValueError(f"{type(module).__name__}'s output is not a scalar multiple of its weight rows, so W_E "
                         "(the table with hook_embed == W_E[ids]) is undefined; read hook_embed from a cache instead")
    return c


def head_input_problem(gm: fx.GraphModule, hf: nn.Module, sites: dict) -> str | None:
    """Why ``ln_final.hook_out @ W_U`` would not be the logits, or ``None`` when the LM head reads it directly."""
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    path = next((n for n, m in hf.named_modules() if m is head), None) if head is not None else None
    final = sites.get("ln_final.hook_out")
    if not path or final is None or final.node is None:
        return None  # no LM head or no final norm: W_U raises for that reason instead
    ix = ModuleIndex(gm.graph)
    aten = torch.ops.aten
    lin = [n for n in ix.nodes(path) if is_op(n, {aten.linear.default, aten.mm.default, aten.matmul.default})]
    if len(lin) != 1:
        return None if not lin else f"the LM head {path} has {len(lin)} matmuls"
    x = lin[0].args[0]
    while is_op(x, SHAPE_OPS):
        x = x.args[0]
    if x.name == final.node:
        return None
    return (f"the LM head {path} does not read ln_final.hook_out directly ({ix.path(x) or 'the top level'} sits "
            "between them: a head transform or a projection)")
