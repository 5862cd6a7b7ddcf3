"""Cache analyses as free functions: residual decompositions, head results, direct logit attribution.

TransformerLens keeps these on its 1,700-line ``ActivationCache``; here they are functions of
``(cache, model)``. Stacks are ``[n_components, batch, pos, d_model]`` (``pos`` dropped when
``pos_slice`` is an int). Weights are not folded: :func:`apply_ln_to_stack` divides by the
cached norm scale (and centres for LayerNorm), and :func:`tokens_to_residual_directions`
multiplies the unembedding by the final norm's weight, so that with the cached scale the
attributions of a full decomposition sum *exactly* to the logit difference, minus the final
norm's bias and ``b_U`` terms (zero for RMSNorm models without an LM-head bias).
"""

from __future__ import annotations

import torch

from ..cache import ActivationCache

PosSlice = int | slice | None


def _pos(x: torch.Tensor, pos_slice: PosSlice, dim: int = -2) -> torch.Tensor:
    if pos_slice is None:
        return x
    index = [slice(None)] * x.dim()
    index[dim] = pos_slice
    return x[tuple(index)]


def _empty(cache: ActivationCache, pos_slice: PosSlice) -> torch.Tensor:
    """A stack of zero components shaped like the residual stream."""
    _need(cache, ["blocks.0.hook_resid_pre"])
    ref = _pos(cache["blocks.0.hook_resid_pre"], pos_slice)
    return ref.new_zeros((0, *ref.shape))


def _need(cache: ActivationCache, names: list[str]) -> None:
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"the cache lacks {missing[:4]}{'...' if len(missing) > 4 else ''}; run run_with_cache "
                       "without names_filter (or include them)")


def _layer(model, layer: int | None) -> int:
    n = model.cfg.n_layers
    layer = n if layer is None else (layer + n if layer < 0 else layer)
    if not 0 <= layer <= n:
        raise ValueError(f"layer must be in [0, {n}]")
    return layer


def _no_post_norm(model) -> None:
    if model.family.attn_post_norm or model.family.mlp_post_norm or model.family.post_norm:
        raise ValueError(f"{model.cfg.family} applies norms to the branch outputs before the residual add: "
                         "attention/MLP outputs are not linear in heads or neurons, so this decomposition is undefined")


def accumulated_resid(cache: ActivationCache, model, layer: int | None = None, incl_mid: bool = False,
                      apply_ln: bool = False, pos_slice: PosSlice = None, return_labels: bool = False):
    """The residual stream entering each block up to ``layer`` (plus ``final_post`` when ``layer`` is the last).

    Returns ``[n_components, batch, pos, d_model]`` (and labels like ``"3_pre"``, ``"3_mid"``).
    """
    layer = _layer(model, layer)
    names, labels = [], []
    for L in range(layer):
        names.append(f"blocks.{L}.hook_resid_pre")
        labels.append(f"{L}_pre")
        if incl_mid:
            names.append(f"blocks.{L}.hook_resid_mid")
            labels.append(f"{L}_mid")
    if layer == model.cfg.n_layers:
        names.append(f"blocks.{layer - 1}.hook_resid_post")
        labels.append("final_post")
    _need(cache, names)
    stack = torch.stack([_pos(cache[n], pos_slice) for n in names])
    if apply_ln:
        stack = apply_ln_to_stack(stack, cache, model, layer, pos_slice)
    return (stack, labels) if return_labels else stack


def decompose_resid(cache: ActivationCache, model, layer: int | None = None, mode: str = "all",
                    incl_embeds: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None,
                    return_labels: bool = False):
    """What each component wrote to the residual stream before ``layer``: embeddings, then each
    block's ``attn_out`` and ``mlp_out`` (``mode``: ``"all"``, ``"attn"`` or ``"mlp"``).

    The components sum to ``blocks.{layer}.hook_resid_pre`` (the final ``resid_post`` for the last).
    """
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', not {mode!r}")
    _no_post_norm(model)
    layer = _layer(model, layer)
    names, labels = [], []
    if incl_embeds:
        names.append("hook_embed")
        labels.append("embed")
        if "hook_pos_embed" in model.sites:
            names.append("hook_pos_embed")
            labels.append("pos_embed")
    for L in range(layer):
        for kind in ("attn", "mlp"):
            if mode in ("all", kind):
                names.append(f"blocks.{L}.hook_{kind}_out")
                labels.append(f"{L}_{kind}_out")
    _need(cache, names)
    if not names:
        return (_empty(cache, pos_slice), labels) if return_labels else _empty(cache, pos_slice)
    ref = _pos(cache[names[0]], pos_slice)
    stack = torch.stack([_pos(cache[n], pos_slice).expand_as(ref) for n in names])
    if apply_ln:
        stack = apply_ln_to_stack(stack, cache, model, layer, pos_slice)
    return (stack, labels) if return_labels else stack


def head_results(cache: ActivationCache, model, layer: int) -> torch.Tensor:
    """Each head's contribution to ``hook_attn_out`` of ``layer``: ``[batch, pos, n_heads, d_model]``
    (their sum plus ``b_O`` is the attention output)."""
    _need(cache, [f"blocks.{layer}.attn.hook_z"])
    return torch.einsum("bphd,hdm->bphm", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])


def compute_head_results(cache: ActivationCache, model) -> ActivationCache:
    """A new cache with ``blocks.L.attn.hook_result`` (``[batch, pos, n_heads, d_model]``) for every layer."""
    _no_post_norm(model)
    data = dict(cache)
    for L in range(model.cfg.n_layers):
        data[f"blocks.{L}.attn.hook_result"] = head_results(cache, model, L)
    return ActivationCache(data, cache.has_batch_dim, cache.model)


def stack_head_results(cache: ActivationCache, model, layer: int | None = None, pos_slice: PosSlice = None,
                       apply_ln: bool = False, return_labels: bool = False):
    """Every head's output before ``layer``: ``[layer * n_heads, batch, pos, d_model]``, labels ``"L3H5"``."""
    _no_post_norm(model)
    layer = _layer(model, layer)
    parts = [_pos(head_results(cache, model, L), pos_slice, dim=-3) for L in range(layer)]
    stack = torch.cat([p.movedim(-2, 0) for p in parts]) if parts else _empty(cache, pos_slice)
    labels = [f"L{L}H{h}" for L in range(layer) for h in range(model.cfg.n_heads)]
    if apply_ln:
        stack = apply_ln_to_stack(stack, cache, model, layer, pos_slice)
    return (stack, labels) if return_labels else stack


def stack_neuron_results(cache: ActivationCache, model, layer: int | None = None, pos_slice: PosSlice = None,
                         apply_ln: bool = False, return_labels: bool = False):
    """Every MLP neuron's output before ``layer``: ``[layer * d_mlp, batch, pos, d_model]``, labels ``"L3N7"``."""
    _no_post_norm(model)
    layer = _layer(model, layer)
    parts = []
    for L in range(layer):
        _need(cache, [f"blocks.{L}.mlp.hook_post"])
        post = _pos(cache[f"blocks.{L}.mlp.hook_post"], pos_slice)
        parts.append(torch.einsum("...n,nm->n...m", post, model.W_out[L]))
    stack = torch.cat(parts) if parts else _empty(cache, pos_slice)
    labels = [f"L{L}N{n}" for L in range(layer) for n in range(model.cfg.d_mlp)]
    if apply_ln:
        stack = apply_ln_to_stack(stack, cache, model, layer, pos_slice)
    return (stack, labels) if return_labels else stack


def get_full_resid_decomposition(cache: ActivationCache, model, layer: int | None = None,
                                 expand_neurons: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None,
                                 return_labels: bool = False):
    """Heads, MLPs (or their neurons), embeddings and the summed biases before ``layer``.

    The components sum to the residual stream entering ``layer``.
    """
    layer = _layer(model, layer)
    heads, labels = stack_head_results(cache, model, layer, pos_slice, return_labels=True)
    parts = [heads]
    if expand_neurons:
        neurons, n_labels = stack_neuron_results(cache, model, layer, pos_slice, return_labels=True)
    else:
        neurons, n_labels = decompose_resid(cache, model, layer, mode="mlp", incl_embeds=False,
                                            pos_slice=pos_slice, return_labels=True)
    parts.append(neurons)
    labels += n_labels
    embeds, e_labels = decompose_resid(cache, model, 0, incl_embeds=True, pos_slice=pos_slice, return_labels=True)
    parts.append(embeds.expand(-1, *heads.shape[1:]))
    labels += e_labels
    bias = model.b_O[:layer].sum(0)
    if expand_neurons:
        bias = bias + model.b_out[:layer].sum(0)
    parts.append(bias.expand(1, *heads.shape[1:]))
    labels.append("bias")
    stack = torch.cat(parts)
    if apply_ln:
        stack = apply_ln_to_stack(stack, cache, model, layer, pos_slice)
    return (stack, labels) if return_labels else stack


def apply_ln_to_stack(stack: torch.Tensor, cache: ActivationCache, model, layer: int | None = None,
                      pos_slice: PosSlice = None, mlp_input: bool = False) -> torch.Tensor:
    """Divide each component by the norm scale the model applied at ``layer`` (centring first for LayerNorm).

    ``layer`` = ``n_layers`` (default) uses ``ln_final``; otherwise block ``layer``'s ln1 (ln2 with
    ``mlp_input``). The norm's weight is *not* applied (see :func:`tokens_to_residual_directions`).
    """
    layer = _layer(model, layer)
    name = ("ln_final.hook_scale" if layer == model.cfg.n_layers
            else f"blocks.{layer}.{'ln2' if mlp_input else 'ln1'}.hook_scale")
    _need(cache, [name])
    if model.cfg.normalization_type.startswith("LN"):
        stack = stack - stack.mean(-1, keepdim=True)
    return stack / _pos(cache[name], pos_slice)


def tokens_to_residual_directions(model, tokens: torch.Tensor | int) -> torch.Tensor:
    """``w_ln_final * W_U[:, tokens]``: the direction in the normalised residual stream that writes each
    token's logit (``[..., d_model]`` for ``tokens`` of shape ``[...]``)."""
    w, _ = model.ln_final_affine()
    t = torch.as_tensor(tokens, device=model.W_U.device)
    return (model.W_U[:, t].movedim(0, -1)) * w


def logit_attrs(model, residual_stack: torch.Tensor, tokens: torch.Tensor | int,
                incorrect_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Direct logit attribution of each component: ``stack @ direction(tokens)`` (minus ``incorrect_tokens``).

    Args:
        residual_stack: ``[n_components, ..., d_model]``, already normalised with :func:`apply_ln_to_stack`.
        tokens: a token id, or ids broadcasting against the stack's middle dims (e.g. ``[batch]``).
        incorrect_tokens: subtract their attributions (logit-difference attribution).

    Returns:
        ``[n_components, ...]``.
    """
    directions = tokens_to_residual_directions(model, tokens)
    if incorrect_tokens is not None:
        directions = directions - tokens_to_residual_directions(model, incorrect_tokens)
    return (residual_stack * directions).sum(-1)


def logit_bias_terms(model, tokens: torch.Tensor | int, incorrect_tokens: torch.Tensor | int | None = None
                     ) -> torch.Tensor:
    """What no component writes: the final norm's bias through ``W_U`` plus ``b_U`` (per token or difference)."""
    _, b = model.ln_final_affine()
    t = torch.as_tensor(tokens, device=model.W_U.device)
    out = b @ model.W_U[:, t] + model.b_U[t]
    if incorrect_tokens is not None:
        out = out - logit_bias_terms(model, incorrect_tokens)
    return out
