"""Cache analyses as free functions of ``(cache, model, ...)``: TransformerLens' ``ActivationCache`` methods.

Arguments, defaults, labels and shapes follow TransformerLens 4.3: ``layer`` is in ``[0, n_layers]``
with ``None`` / ``-1`` meaning ``n_layers`` (the unembedding input); ``pos_slice`` / ``batch_slice``
take TL's :class:`~fxlens.utils.Slice` inputs (an int drops the dim); stacks are
``[n_components, batch, pos, d_model]`` (``batch`` absent on a cache whose batch dim was removed).

Weights are not folded. :func:`apply_ln_to_stack` divides by the cached norm scale (centring first
for LayerNorm) and :func:`tokens_to_residual_directions` multiplies the unembedding by the final
norm's weight, so :func:`logit_attrs` of a full decomposition sums *exactly* to the logit
difference minus :func:`logit_bias_terms` (the final norm's bias through ``W_U`` and ``b_U``;
zero for RMSNorm models without an LM-head bias). On a model with folded norms
(``process_weights`` / the ``HookedTransformer`` entry point) the weight is 1 and every number
is TransformerLens'.
"""

from __future__ import annotations

import torch

from ..activations import Activations
from ..utils import Slice, as_slice


def _need(cache: Activations, names: list[str]) -> None:
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"the cache lacks {missing[:4]}{'...' if len(missing) > 4 else ''}; run run_with_cache "
                       "without names_filter (or include them)")


def _layer(model, layer: int | None, top: int | None = None) -> int:
    """TL's rule: ``None`` and ``-1`` mean ``n_layers``; anything else must be in ``[0, n_layers]``."""
    n = model.cfg.n_layers
    layer = n if layer is None or layer == -1 else layer
    if not 0 <= layer <= (n if top is None else top):
        raise ValueError(f"layer must be in [0, {n}] (or -1 / None for {n}, the unembedding input), not {layer}")
    return layer


def _no_post_norm(model) -> None:
    fam = model.family
    if fam.attn_post_norm or fam.mlp_post_norm or fam.post_norm:
        raise ValueError(f"{model.cfg.family} applies norms to the branch outputs before the residual add: "
                         "attention/MLP outputs are not linear in heads or neurons, so this decomposition is undefined")


def _linear_resid(model, incl_embeds: bool) -> None:
    """Refuse a decomposition whose parts would not sum to the residual stream (see :func:`decompose_resid`)."""
    if model.family.post_norm:
        raise ValueError(f"{model.cfg.family} norms the residual stream after each add (post-norm blocks): the "
                         "residual is not a sum of branch outputs, so it has no additive decomposition")
    embed = model.sites.get("hook_embed")
    if incl_embeds and embed is not None and embed.extra.get("sums_to_resid") is False:
        raise ValueError(f"in {model.cfg.family}, blocks.0.hook_resid_pre is not hook_embed + hook_pos_embed (an "
                         "embedding LayerNorm or another embedding sits between them), so the parts would not sum "
                         "to the residual stream. Use blocks.0.hook_resid_pre as the embedding term: "
                         "cache['blocks.0.hook_resid_pre'] plus decompose_resid(..., incl_embeds=False)")


def _attn_only(model) -> bool:
    return bool(getattr(model.cfg, "attn_only", False))


def _shape_ref(cache: Activations, pos_slice: Slice) -> torch.Tensor:
    name = "hook_embed" if cache.has_embed else "blocks.0.hook_resid_pre"
    _need(cache, [name])
    return pos_slice.apply(cache[name], -2)


def _empty(cache: Activations, pos_slice: Slice, last: int | None = None) -> torch.Tensor:
    ref = _shape_ref(cache, pos_slice)
    shape = ref.shape if last is None else (*ref.shape[:-1], last)
    return ref.new_zeros((0, *shape))


def _labels_out(stack: torch.Tensor, labels: list[str], return_labels: bool):
    return (stack, labels) if return_labels else stack


# -- the residual stream ---------------------------------------------------------------------------------
def accumulated_resid(cache: Activations, model, layer: int | None = None, incl_mid: bool = False,
                      apply_ln: bool = False, pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
    """The residual stream entering each block up to and including ``layer`` (``"3_pre"``, ``"3_mid"``),
    and ``"final_post"`` when ``layer`` is ``n_layers``: ``[n_components, batch, pos, d_model]``.

    ``apply_ln`` at ``n_layers`` applies the final norm to each component with its own statistics
    (TL's logit lens, weight and bias included); at an earlier layer it divides by the cached scale.
    """
    pos_slice, n = as_slice(pos_slice), model.cfg.n_layers
    layer = _layer(model, layer)
    names, labels = [], []
    for L in range(layer + 1):
        if L == n:
            names.append(f"blocks.{n - 1}.hook_resid_post")
            labels.append("final_post")
            continue
        names.append(f"blocks.{L}.hook_resid_pre")
        labels.append(f"{L}_pre")
        if (incl_mid and L < layer) or (mlp_input and L == layer):
            names.append(f"blocks.{L}.hook_resid_mid")
            labels.append(f"{L}_mid")
    _need(cache, names)
    stack = torch.stack([pos_slice.apply(cache[x], -2) for x in names])
    if apply_ln:
        stack = apply_ln_to_stack(cache, model, stack, layer, mlp_input, pos_slice, has_batch_dim=cache.has_batch_dim,
                                  recompute_ln=layer == n)
    return _labels_out(stack, labels, return_labels)


def decompose_resid(cache: Activations, model, layer: int | None = None, mlp_input: bool = False,
                    mode: str = "all", apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                    return_labels: bool = False):
    """What wrote the residual stream entering ``layer``: ``embed``, ``pos_embed``, then each block's
    ``attn_out`` / ``mlp_out`` (``mode`` ``"all"``, ``"attn"`` or ``"mlp"``; ``mlp_input`` adds the
    layer's own ``attn_out``). The components sum to that residual stream; raises where they would not
    (post-norm blocks; with ``incl_embeds``, an embedding LayerNorm before block 0)."""
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', not {mode!r}")
    pos_slice = as_slice(pos_slice)
    layer = _layer(model, layer, model.cfg.n_layers - 1 if mlp_input else None)
    _linear_resid(model, incl_embeds)
    incl_attn, incl_mlp = mode != "mlp", mode != "attn" and not _attn_only(model)
    names, labels = [], []
    if incl_embeds:
        for site, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if site in model.sites:
                names.append(site)
                labels.append(label)
    for L in range(layer):
        for kind, on in (("attn", incl_attn), ("mlp", incl_mlp)):
            if on:
                names.append(f"blocks.{L}.hook_{kind}_out")
                labels.append(f"{L}_{kind}_out")
    if mlp_input and incl_attn:
        names.append(f"blocks.{layer}.hook_attn_out")
        labels.append(f"{layer}_attn_out")
    _need(cache, names)
    if not names:
        return _labels_out(_empty(cache, pos_slice), labels, return_labels)
    parts = [pos_slice.apply(cache[x], -2) for x in names]
    shape = torch.broadcast_shapes(*(p.shape for p in parts))  # position embeddings may broadcast over batch
    stack = torch.stack([p.expand(shape) for p in parts])
    if apply_ln:
        stack = apply_ln_to_stack(cache, model, stack, layer, mlp_input, pos_slice)
    return _labels_out(stack, labels, return_labels)


def accumulated_bias(model, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
    """``[d_model]``: the summed ``b_O`` (and ``b_out``) of the blocks before ``layer`` (TL's
    ``model.accumulated_bias``); ``mlp_input`` adds ``layer``'s own ``b_O``."""
    n = model.cfg.n_layers
    if not 0 <= layer <= n or (mlp_input and layer >= n):
        raise ValueError(f"layer must be in [0, {n}] ({n - 1} at most with mlp_input)")
    bias = model.b_O[:layer].sum(0)
    if include_mlp_biases and not _attn_only(model):
        bias = bias + model.b_out[:layer].sum(0)
    if mlp_input:
        bias = bias + model.b_O[layer]
    return bias


# -- heads and neurons ------------------------------------------------------------------------------------
def has_head_results(cache: Activations, model, layer: int) -> bool:
    """Whether the cache holds a valid ``blocks.{layer}.attn.hook_result`` (``set_use_attn_result`` runs cache it)."""
    x = cache.cache_dict.get(f"blocks.{layer}.attn.hook_result")
    want = 4 if cache.has_batch_dim else 3
    return isinstance(x, torch.Tensor) and x.ndim == want and x.shape[-2] == model.cfg.n_heads


def head_results(cache: Activations, model, layer: int) -> torch.Tensor:
    """Each head's contribution to ``hook_attn_out`` of ``layer``: ``[batch, pos, n_heads, d_model]``
    (their sum plus ``b_O`` is the attention output)."""
    if has_head_results(cache, model, layer):
        return cache.cache_dict[f"blocks.{layer}.attn.hook_result"]
    _need(cache, [f"blocks.{layer}.attn.hook_z"])
    z = cache[f"blocks.{layer}.attn.hook_z"]
    W = model.W_O[layer]
    dtype = torch.promote_types(z.dtype, W.dtype)
    return torch.einsum("...hd,hdm->...hm", z.to(dtype), W.to(dtype))


def compute_head_results(cache: Activations, model) -> Activations:
    """A new cache with ``blocks.L.attn.hook_result`` for every layer (``ActivationCache.compute_head_results``
    adds them in place)."""
    _no_post_norm(model)
    data = dict(cache.cache_dict)
    for L in range(model.cfg.n_layers):
        data[f"blocks.{L}.attn.hook_result"] = head_results(cache, model, L)
    return type(cache)(data, cache.model, has_batch_dim=cache.has_batch_dim)


def _remainder(cache: Activations, target: tuple, pos_slice: Slice, components: torch.Tensor) -> torch.Tensor:
    """The rest of the residual stream ``target`` that ``components`` leave: ``[1, ...]``."""
    full = pos_slice.apply(cache[target], -2)
    return (full - components.sum(0) if components.shape[0] else full)[None]


def stack_head_results(cache: Activations, model, layer: int = -1, return_labels: bool = False,
                       incl_remainder: bool = False, pos_slice=None, apply_ln: bool = False):
    """Every head's output before ``layer``: ``[layer * n_heads, batch, pos, d_model]``, labels ``"L3H5"``
    (``incl_remainder`` adds ``"remainder"``: the rest of ``resid_post`` of ``layer - 1``)."""
    _no_post_norm(model)
    pos_slice = as_slice(pos_slice)
    layer = _layer(model, layer)
    parts = [pos_slice.apply(head_results(cache, model, L), -3) for L in range(layer)]
    stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else _empty(cache, pos_slice)
    labels = [f"L{L}H{h}" for L in range(layer) for h in range(model.cfg.n_heads)]
    if incl_remainder:
        stack = torch.cat([stack, _remainder(cache, ("resid_post", layer - 1), pos_slice, stack)])
        labels.append("remainder")
    if apply_ln:
        stack = apply_ln_to_stack(cache, model, stack, layer, pos_slice=pos_slice)
    return _labels_out(stack, labels, return_labels)


def get_neuron_results(cache: Activations, model, layer: int, neuron_slice=None, pos_slice=None,
                       project_output_onto: torch.Tensor | None = None) -> torch.Tensor:
    """Each neuron's output of ``layer``'s MLP: ``[batch, pos, d_mlp, d_model]`` (``d_model`` replaced by the
    projection's outputs, or dropped for a ``[d_model]`` one, with ``project_output_onto``)."""
    _no_post_norm(model)
    neuron_slice, pos_slice = as_slice(neuron_slice), as_slice(pos_slice)
    _need(cache, [f"blocks.{layer}.mlp.hook_post"])
    acts = neuron_slice.apply(pos_slice.apply(cache[f"blocks.{layer}.mlp.hook_post"], -2), -1)
    W_out = neuron_slice.apply(model.W_out[layer], 0)
    if project_output_onto is None:
        return acts[..., None] * W_out
    projected = W_out @ project_output_onto
    return acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected


def stack_neuron_results(cache: Activations, model, layer: int | None = None, pos_slice=None, neuron_slice=None,
                         return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                         project_output_onto: torch.Tensor | None = None, mlp_input: bool = False):
    """Every MLP neuron's output before ``layer``: ``[layer * d_mlp, batch, pos, d_model]``, labels ``"L3N7"``.

    ``project_output_onto`` (``[d_model]`` or ``[d_model, k]``) projects each output without building the
    ``d_mlp x d_model`` products (with ``apply_ln`` too); ``incl_remainder`` adds the rest of the
    stream (``resid_mid`` of ``layer`` with ``mlp_input``, else ``resid_post`` of ``layer - 1``);
    ``mlp_input`` uses ln2's scale for ``apply_ln``.
    """
    layer = _layer(model, layer)
    pos_slice, neuron_slice = as_slice(pos_slice), Slice.unwrap(neuron_slice)
    if neuron_slice.mode == "int":
        neuron_slice = Slice([neuron_slice.slice])
    proj = project_output_onto
    squeeze = proj is not None and proj.ndim == 1
    proj = proj[:, None] if squeeze else proj
    ids = neuron_slice.apply(torch.arange(model.cfg.d_mlp), 0).tolist()
    labels = [f"L{L}N{h}" for L in range(layer) for h in ids]
    target = ("resid_mid", layer) if mlp_input else ("resid_post", layer - 1)
    folded = apply_ln and proj is not None
    if folded:  # LN_s(a W) p = (a / s) (W p - mean(W) sum(p)): linear in each neuron's activation
        scale = _scale(cache, model, layer, mlp_input, pos_slice, as_slice(None))
        centre = _centres(model, layer)
        parts = []
        for L in range(layer):
            W = neuron_slice.apply(model.W_out[L], 0)
            lin = W @ proj - (W.mean(-1, keepdim=True) * proj.sum(0) if centre else 0)
            acts = neuron_slice.apply(pos_slice.apply(cache[f"blocks.{L}.mlp.hook_post"], -2), -1)
            parts.append((acts / scale)[..., None] * lin)
    else:
        parts = [get_neuron_results(cache, model, L, neuron_slice, pos_slice, proj) for L in range(layer)]
    stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else _empty(
        cache, pos_slice, None if proj is None else proj.shape[-1])
    if incl_remainder:
        full = pos_slice.apply(cache[target], -2)
        if folded:
            full = apply_ln_to_stack(cache, model, full[None], layer, mlp_input, pos_slice)[0]
        full = full @ proj if proj is not None else full
        stack = torch.cat([stack, (full - stack.sum(0) if stack.shape[0] else full)[None]])
        labels.append("remainder")
    if apply_ln and not folded:
        stack = apply_ln_to_stack(cache, model, stack, layer, mlp_input, pos_slice)
    return _labels_out(stack.squeeze(-1) if squeeze else stack, labels, return_labels)


def get_full_resid_decomposition(cache: Activations, model, layer: int | None = None, mlp_input: bool = False,
                                 expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                 return_labels: bool = False, project_output_onto: torch.Tensor | None = None):
    """Heads, then neurons (or MLP outputs), ``embed``, ``pos_embed`` and the summed ``"bias"``, before
    ``layer`` (with ``mlp_input``: before its MLP). The components sum to that residual stream."""
    layer = _layer(model, layer, model.cfg.n_layers - 1 if mlp_input else None)
    _linear_resid(model, True)
    pos_slice = as_slice(pos_slice)
    proj = project_output_onto
    squeeze = proj is not None and proj.ndim == 1
    proj = proj[:, None] if squeeze else proj

    def finish(stack: torch.Tensor) -> torch.Tensor:  # norm then projection, per component
        if apply_ln and proj is not None:
            stack = apply_ln_to_stack(cache, model, stack, layer, mlp_input, pos_slice)
        return stack @ proj if proj is not None else stack

    heads, labels = stack_head_results(cache, model, layer + (1 if mlp_input else 0), return_labels=True,
                                       pos_slice=pos_slice)
    parts = [finish(heads)]
    if not _attn_only(model) and layer > 0:
        if expand_neurons:
            neurons, n_labels = stack_neuron_results(cache, model, layer, pos_slice, return_labels=True,
                                                     apply_ln=apply_ln and proj is not None,
                                                     project_output_onto=proj, mlp_input=mlp_input)
            parts.append(neurons)
        else:
            mlps, n_labels = decompose_resid(cache, model, layer, mlp_input, mode="mlp", pos_slice=pos_slice,
                                             incl_embeds=False, return_labels=True)
            parts.append(finish(mlps))
        labels += n_labels
    embeds, e_labels = decompose_resid(cache, model, 0, mode="attn", pos_slice=pos_slice, return_labels=True)
    parts.append(finish(embeds.expand(-1, *heads.shape[1:])))
    labels += e_labels
    bias = accumulated_bias(model, layer, mlp_input, include_mlp_biases=expand_neurons)
    parts.append(finish(bias.to(heads.dtype).expand(1, *heads.shape[1:])))
    labels.append("bias")
    stack = torch.cat(parts)
    if apply_ln and proj is None:
        stack = apply_ln_to_stack(cache, model, stack, layer, mlp_input, pos_slice)
    return _labels_out(stack.squeeze(-1) if squeeze else stack, labels, return_labels)


# -- norms and the unembedding ------------------------------------------------------------------------------
def _centres(model, layer: int) -> bool:
    return model.cfg.normalization_type.startswith("LN") and not (
        layer == model.cfg.n_layers and getattr(model.cfg, "final_rms", False))


def _scale(cache: Activations, model, layer: int, mlp_input: bool, pos_slice: Slice,
           batch_slice: Slice) -> torch.Tensor:
    if layer == model.cfg.n_layers:
        if mlp_input:
            raise ValueError("mlp_input=True needs a block's layer (< n_layers): the unembedding has no MLP")
        name = "ln_final.hook_scale"
    else:
        ln = "ln2" if mlp_input else "ln1"
        if getattr(model.family, ln) is None:
            raise ValueError(f"{model.cfg.family} blocks have no {ln} ({'the MLP' if mlp_input else 'attention'} "
                             f"reads {'a shared norm' if mlp_input and model.family.ln1 else 'the raw residual'}), so "
                             f"there is no {ln} scale to apply at layer {layer}; use apply_ln=False"
                             + (" or mlp_input=False" if mlp_input and model.family.ln1 else ""))
        name = f"blocks.{layer}.{ln}.hook_scale"
    _need(cache, [name])
    scale = pos_slice.apply(cache[name], -2)
    return batch_slice.apply(scale, 0) if cache.has_batch_dim else scale


def final_norm(model, x: torch.Tensor) -> torch.Tensor:
    """The model's own final norm module applied to ``x [..., d_model]`` (its weight and bias included)."""
    if model.family.ln_final is None:
        raise ValueError("this model has no final norm")
    module = model.hf_model.get_submodule(model.family.ln_final)
    flat = x.reshape(-1, 1, x.shape[-1])
    return module(flat).reshape(x.shape)


def apply_ln_to_stack(cache: Activations, model, residual_stack: torch.Tensor, layer: int | None = None,
                      mlp_input: bool = False, pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                      recompute_ln: bool = False) -> torch.Tensor:
    """Treat each component as the input of ``layer``'s ln1 (ln2 with ``mlp_input``; ``ln_final`` for
    ``n_layers``, ``None`` or ``-1``) and divide it by the cached scale, centring first for LayerNorm.

    The norm's weight is *not* applied (see :func:`tokens_to_residual_directions`). ``pos_slice`` is
    the slice already applied to the stack (it is applied to the scale); ``batch_slice`` is applied to
    both (the stack's dim 1 when ``has_batch_dim``). ``recompute_ln`` at ``n_layers`` applies the
    final norm module to each component with its own statistics instead (TL's logit lens).
    """
    pos_slice, batch_slice = as_slice(pos_slice), as_slice(batch_slice)
    layer = _layer(model, layer)
    if has_batch_dim:
        residual_stack = batch_slice.apply(residual_stack, 1)
    if model.cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        return residual_stack
    if recompute_ln and layer == model.cfg.n_layers:
        return final_norm(model, residual_stack)
    if _centres(model, layer):
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    return residual_stack / _scale(cache, model, layer, mlp_input, pos_slice, batch_slice)


def _token_ids(model, tokens) -> torch.Tensor | int:
    if isinstance(tokens, str):
        return model.to_single_token(tokens)
    if isinstance(tokens, torch.Tensor):
        return int(tokens.item()) if tokens.numel() == 1 else tokens
    return tokens if isinstance(tokens, int) else torch.as_tensor(tokens)


def tokens_to_residual_directions(model, tokens) -> torch.Tensor:
    """``w_ln_final * W_U[:, tokens]``: the direction in the normalised residual stream that writes each
    token's logit. ``tokens``: a string (one token), an int, or a tensor; ``[d_model]`` for a single
    token (a one-element tensor too, as TL), else ``[*tokens.shape, d_model]``."""
    w, _ = model.ln_final_affine()
    t = _token_ids(model, tokens)
    W = model.W_U[:, t] if isinstance(t, int) else model.W_U[:, t.to(model.W_U.device)].movedim(0, -1)
    return W * w


def scaled_logit_attrs(model, scaled_stack: torch.Tensor, tokens, incorrect_tokens=None) -> torch.Tensor:
    """``scaled_stack @ direction(tokens)`` (minus ``incorrect_tokens``'): for a stack already divided by the
    final norm's scale (``apply_ln=True`` / :func:`apply_ln_to_stack`). ``[n_components, ...]``."""
    directions = tokens_to_residual_directions(model, tokens)
    if incorrect_tokens is not None:
        directions = directions - tokens_to_residual_directions(model, incorrect_tokens)
    return (scaled_stack * directions).sum(-1)


def logit_attrs(cache: Activations, model, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                pos_slice=None, batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
    """TL's direct logit attribution: the stack (*not* yet normalised) is scaled by ``ln_final``'s cached
    scale, then dotted with the tokens' residual directions (minus ``incorrect_tokens``'). ``pos_slice`` /
    ``batch_slice`` are the slices already applied to the stack. ``tokens``: a string, an int, or ids
    ``[batch]`` / ``[batch, pos]``. Returns ``[n_components, *batch_and_pos]``."""
    if not isinstance(cache, Activations):
        raise TypeError("logit_attrs(cache, model, residual_stack, tokens, ...) scales the stack itself, as "
                        "TransformerLens does; for a stack already normalised use scaled_logit_attrs(model, stack, "
                        "tokens, incorrect_tokens)")
    batch_slice = as_slice(batch_slice)
    if incorrect_tokens is not None:
        a, b = (torch.as_tensor(_token_ids(model, t)) for t in (tokens, incorrect_tokens))
        if a.shape != b.shape:
            raise ValueError(f"tokens and incorrect_tokens must have the same shape! (tokens.shape={a.shape}, "
                             f"incorrect_tokens.shape={b.shape})")
    directions = tokens_to_residual_directions(model, tokens)
    if incorrect_tokens is not None:
        directions = directions - tokens_to_residual_directions(model, incorrect_tokens)
    scaled = apply_ln_to_stack(cache, model, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                               has_batch_dim=has_batch_dim)
    if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4 and directions.ndim == 2
            and directions.shape[0] == scaled.shape[1]):
        directions = directions.unsqueeze(-2)  # per-example directions broadcast over positions
    return (scaled * directions).sum(-1)


def logit_bias_terms(model, tokens, incorrect_tokens=None) -> torch.Tensor:
    """What no component writes: the final norm's bias through ``W_U`` plus ``b_U`` (per token or difference)."""
    _, b = model.ln_final_affine()
    t = _token_ids(model, tokens)
    t = t if isinstance(t, int) else t.to(model.W_U.device)
    out = b @ model.W_U[:, t] + model.b_U[t]
    if incorrect_tokens is not None:
        out = out - logit_bias_terms(model, incorrect_tokens)
    return out
