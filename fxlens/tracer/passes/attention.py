"""Expand a fused SDPA call into scores -> pattern -> z, so those sites exist."""

from __future__ import annotations

import math

import torch
from torch import fx


def attn_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
                is_causal: bool) -> torch.Tensor:
    """Scaled, masked attention logits ``[batch, head, q_pos, k_pos]`` (-inf where masked)."""
    if k.shape[1] != q.shape[1]:  # enable_gqa: repeat KV heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if is_causal:
        n_q, n_k = scores.shape[-2:]
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores


def attn_pattern(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys; fully masked rows (left padding) become zeros, not NaN."""
    pattern = torch.softmax(scores, dim=-1)
    return torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)


def attn_z(pattern: torch.Tensor, v: torch.Tensor, pos_major: bool = False) -> torch.Tensor:
    """Per-head outputs ``[batch, head, pos, d_head]``; ``pos_major`` lays them out in memory as
    ``[batch, pos, head, d_head]``, as the fused kernel did (code that ``view``s its transpose needs it)."""
    if v.shape[1] != pattern.shape[1]:
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], dim=1)
    z = torch.matmul(pattern, v)
    return z.transpose(1, 2).contiguous().transpose(1, 2) if pos_major else z


def expand_sdpa(graph: fx.Graph, sdpa: fx.Node, pos_major: bool = False) -> dict[str, fx.Node]:
    """Replace ``sdpa`` by explicit ops; returns the new scores/pattern/z nodes. ``pos_major``: the fused
    kernel's output was laid out ``[batch, pos, head, d_head]`` (:func:`pos_major`, read at capture)."""
    q, k, v, *rest = sdpa.args
    kw = dict(sdpa.kwargs)
    mask = rest[0] if rest else kw.get("attn_mask")
    is_causal = rest[2] if len(rest) > 2 else kw.get("is_causal", False)
    if (rest[1] if len(rest) > 1 else kw.get("dropout_p", 0.0)) not in (0, 0.0):
        raise ValueError(f"{sdpa.name}: attention dropout is active; call model.eval() before tracing")
    with graph.inserting_before(sdpa):
        scores = graph.call_function(attn_scores, (q, k, mask, kw.get("scale"), bool(is_causal)))
        pattern = graph.call_function(attn_pattern, (scores,))
        z = graph.call_function(attn_z, (pattern, v, pos_major))
    for n in (scores, pattern, z):
        n.meta["nn_module_stack"] = sdpa.meta.get("nn_module_stack", {})
    sdpa.replace_all_uses_with(z)
    graph.erase_node(sdpa)
    return {"hook_attn_scores": scores, "hook_pattern": pattern, "hook_z": z}


def pos_major(sdpa: fx.Node) -> bool:
    """Whether the captured SDPA output was laid out ``[batch, pos, head, d_head]`` in memory."""
    val = sdpa.meta.get("val")
    try:
        stride = val.stride()
        # plain bools (symbolic dims give SymBools, which must not reach the site table / graph cache)
        return bool(val.dim() == 4 and val.shape[1] > 1 and val.shape[2] > 1 and stride[1] < stride[2])
    except (AttributeError, RuntimeError, TypeError):
        return False

