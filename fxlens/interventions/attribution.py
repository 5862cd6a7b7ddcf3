"""Attribution patching (Nanda 2023; the AtP of Kramár et al. 2024): every cell of a TL patching grid
estimated from one clean forward, one corrupted forward and one backward.

Activation patching writes a clean activation ``a_clean`` into the corrupted run and measures the
metric. Its first-order estimate around the corrupted run is

    metric(patched) ~ metric(corrupted) + sum_cell (a_clean - a_corrupted) . d metric / d a |_corrupted

so one backward pass through the corrupted run gives every cell of every grid at once. The grids
and their shapes are those of :mod:`fxlens.interventions.patching` (``"resid_pre"`` is the estimate
of ``get_act_patch_resid_pre``, ``[n_layers, pos]``; ``"attn_head_out_all_pos"`` of
``get_act_patch_attn_head_out_all_pos``, ``[n_layers, n_heads]``; ...). Cells whose clean and
corrupted activations are equal get the corrupted metric (to the rounding of the attention kernel,
which may differ between the clean run and the corrupted run with autograd). The estimate is linear: it is
poor where the metric saturates (attention softmax, large patches); compare with the exact sweep
(``docs/attribution_patching.md``) before trusting a ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..cache import ActivationCache, act_name

#: grid -> (activation, einsum reducing ``delta * grad`` to one layer's cells)
GRIDS: dict[str, tuple[str, str]] = {
    "resid_pre": ("resid_pre", "bpd->p"),
    "resid_mid": ("resid_mid", "bpd->p"),
    "resid_post": ("resid_post", "bpd->p"),
    "attn_out": ("attn_out", "bpd->p"),
    "mlp_out": ("mlp_out", "bpd->p"),
    "attn_head_out_all_pos": ("z", "bphd->h"),
    "attn_head_out_by_pos": ("z", "bphd->ph"),
    "attn_head_q_all_pos": ("q", "bphd->h"),
    "attn_head_q_by_pos": ("q", "bphd->ph"),
    "attn_head_k_all_pos": ("k", "bphd->h"),
    "attn_head_k_by_pos": ("k", "bphd->ph"),
    "attn_head_v_all_pos": ("v", "bphd->h"),
    "attn_head_v_by_pos": ("v", "bphd->ph"),
    "attn_head_pattern_all_pos": ("pattern", "bhqk->h"),
    "attn_head_pattern_by_pos": ("pattern", "bhqk->hq"),
    "attn_head_pattern_dest_src_pos": ("pattern", "bhqk->hqk"),
}


def attribution_patch(model, corrupted_tokens, clean, patching_metric: Callable[[torch.Tensor], torch.Tensor],
                      sites: str | Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos"),
                      *, attention_mask=None) -> dict[str, torch.Tensor]:
    """Estimated patching grids ``{grid: tensor}`` (see the module docstring).

    Args:
        corrupted_tokens: the run patched into (text or ids ``[batch, pos]``).
        clean: the clean run's :class:`~fxlens.ActivationCache` (it must hold every activation the
            grids need), or its tokens (then one clean forward caches them).
        patching_metric: logits ``[batch, pos, vocab]`` -> a scalar tensor, differentiable.
        sites: grid names of :data:`GRIDS`.
    """
    sites = [sites] if isinstance(sites, str) else list(sites)
    bad = [s for s in sites if s not in GRIDS]
    if bad or not sites:
        raise ValueError(f"unknown attribution grids {bad or sites}; choose from {list(GRIDS)}")
    names = list(dict.fromkeys(act_name(GRIDS[s][0], L) for s in sites for L in range(model.cfg.n_layers)))
    if not isinstance(clean, ActivationCache):
        _, clean = model.run_with_cache(clean, names_filter=names, attention_mask=attention_mask)
    missing = [n for n in names if n not in clean]
    if missing:
        raise KeyError(f"the clean cache lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: cache them "
                       "(names_filter) or pass the clean tokens instead")
    grads: dict[str, torch.Tensor] = {}

    def keep(g: torch.Tensor, hook) -> None:
        grads[hook.name] = g.detach()

    with torch.enable_grad():
        run = model.run(corrupted_tokens, names=names, bwd_hooks=[(n, keep) for n in names],
                        attention_mask=attention_mask)
        metric = patching_metric(run.out)
        if not isinstance(metric, torch.Tensor) or metric.numel() != 1 or not metric.requires_grad:
            raise ValueError("patching_metric must return a scalar tensor that depends on the logits "
                             f"differentiably, got {type(metric).__name__}"
                             f"{tuple(metric.shape) if isinstance(metric, torch.Tensor) else ''}")
        metric.backward()
    no_grad = [n for n in names if n not in grads]
    if no_grad:
        raise RuntimeError(f"no gradient reached {no_grad[:3]}: the model's parameters do not require grad "
                           "(re-enable requires_grad on model.hf_model's parameters for the call)")
    base = metric.detach().float()
    out = {}
    for s in sites:
        act, spec = GRIDS[s]
        per_layer = []
        for L in range(model.cfg.n_layers):
            n = act_name(act, L)
            c, x = clean[n], run.cache[n]
            if c.shape != x.shape:
                raise ValueError(f"clean {n} has shape {tuple(c.shape)}, the corrupted run {tuple(x.shape)}: "
                                 "clean and corrupted inputs must have the same batch size and length")
            delta = (c.to(x.device).float() - x.float())
            per_layer.append(torch.einsum(f"{spec.split('->')[0]},{spec}", delta, grads[n].float()))
        out[s] = (base + torch.stack(per_layer)).cpu()
    return out
