"""Generation with hooks: HF ``generate`` (KV cache) with hooks at the HF module boundaries.

Re-running the prefix through the captured graph at every step is ~3x slower than HF's
cached decoding, so generation uses the HF model with PyTorch module hooks placed at the
module boundary equivalent to each site (``blocks.L.hook_resid_pre`` = the input of block
``L``, ``hook_attn_out`` = the output of the attention projection, ...). Sites that exist
only inside the graph (attention scores/pattern, rotary q/k, norm scales, split inputs)
cannot be honoured there and raise.

With the KV cache, step ``t > 0`` runs only the new token: a hook sees ``[batch, 1, ...]``,
and ``hook.ctx["pos_offset"]`` tells how many positions came before the current call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..tracer.sites import layer_of, template
from .hooks import HookFn, HookPoint

#: site template -> (module attribute of the family rule, "pre" | "post", reshape to heads?)
_SUPPORTED = {
    "blocks.{L}.hook_resid_pre": ("", "pre"),
    "blocks.{L}.hook_resid_post": ("", "post"),
    "blocks.{L}.hook_attn_out": ("attn_out", "post"),
    "blocks.{L}.hook_mlp_out": ("mlp_out", "post"),
    "blocks.{L}.attn.hook_z": ("attn_out", "pre"),
    "blocks.{L}.mlp.hook_pre": ("mlp_act", "pre"),
    "blocks.{L}.mlp.hook_post": ("mlp_out", "pre"),
    "blocks.{L}.ln1.hook_normalized": ("ln1", "post"),
    "blocks.{L}.ln2.hook_normalized": ("ln2", "post"),
    "ln_final.hook_normalized": ("ln_final", "post"),
    "hook_embed": ("embed", "post"),
    "hook_pos_embed": ("pos_embed", "post"),
}


def _module_for(model, name: str) -> tuple[str, str]:
    """``(module path, "pre" | "post")`` where site ``name`` is seen during HF generation."""
    fam, tpl, L = model.family, template(name), layer_of(name)
    if tpl not in _SUPPORTED:
        raise ValueError(f"{name} cannot be hooked during generation: it exists only inside the captured graph. "
                         f"Generation hooks work at {sorted(_SUPPORTED)}; use run_with_hooks for the rest.")
    attr, kind = _SUPPORTED[tpl]
    if fam.post_norm:
        raise ValueError(f"generation hooks need a pre-norm decoder; {fam.name} is post-norm")
    if attr == "attn_out" and kind == "post" and fam.attn_post_norm:
        attr = "attn_post_norm"
    if attr == "mlp_out" and kind == "post" and fam.mlp_post_norm:
        attr = "mlp_post_norm"
    rel = getattr(fam, attr) if attr else ""
    if rel is None:
        raise ValueError(f"{name}: this {fam.name} model has no {attr} module")
    if model._sites[name].layout == "flat":
        raise ValueError(f"{name}: in this {fam.name} model the module sees flattened [batch*pos, ...] rows, so it "
                         "cannot be hooked during generation; hook the residual stream instead")
    if name == "hook_embed":
        node = next(n for n in model._base.graph.nodes if n.name == model._sites[name].node)
        if node.target is not torch.ops.aten.embedding.default:
            raise ValueError("hook_embed is scaled after the embedding module in this model; during generation "
                             "hook blocks.0.hook_resid_pre instead")
    path = fam.block(L, rel) if L is not None else rel
    return path, kind


def _wrap(name: str, fns: list[HookFn], heads: int | None) -> Callable:
    point = HookPoint(name)
    point.ctx["pos_offset"] = 0

    def apply(x: torch.Tensor) -> torch.Tensor:
        view = x.unflatten(-1, (heads, -1)) if heads else x
        for fn in fns:
            out = fn(view, hook=point)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor) or out.shape != view.shape:
                raise ValueError(f"hook {getattr(fn, '__name__', fn)!r} on {name} returned "
                                 f"{getattr(out, 'shape', type(out).__name__)}; expected shape {tuple(view.shape)}")
            view = out.to(view.dtype)
        point.ctx["pos_offset"] += x.shape[1]
        return view.flatten(-2) if heads else view

    return apply


def _pre(apply: Callable) -> Callable:
    def hook(module, args, kwargs):
        if args:
            return (apply(args[0]), *args[1:]), kwargs
        key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
        return args, {**kwargs, key: apply(kwargs[key])}
    return hook


def _post(apply: Callable) -> Callable:
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (apply(output[0]), *output[1:])
        return apply(output)
    return hook


def generate(model, input, max_new_tokens: int = 10, *,
             fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
             use_model_hooks: bool = True, **hf_kwargs) -> torch.Tensor | str | list[str]:
    """Generate with HF ``generate`` (KV cache), applying hooks at every step.

    Args:
        model: a :class:`~fxlens.HookedModel` of a causal LM.
        input: a string, a list of strings (padded on the left) or token ids ``[batch, pos]``.
        max_new_tokens: tokens to add.
        fwd_hooks: ``[(name or predicate, fn(x, hook))]`` as in ``run_with_hooks``.
        use_model_hooks: also apply hooks already on the model (``add_hook``, ``with model.patch``).
        **hf_kwargs: passed to HF ``generate`` (``do_sample``, ``temperature``, ...); greedy by default.

    Returns:
        Token ids ``[batch, pos + new]`` for token input, decoded text for string input.
    """
    if model.output_kind != "logits":
        raise ValueError("generate needs a causal LM (*ForCausalLM); this model returns hidden states")
    text_in = isinstance(input, (str, list)) and not (isinstance(input, list) and input and isinstance(input[0], int))
    if text_in:
        ids = model.to_tokens(input, padding_side="left")
        mask = model.last_attention_mask
    else:
        ids = torch.as_tensor(input, device=model.device)
        ids = ids[None] if ids.dim() == 1 else ids
        mask = hf_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(ids) if mask is None else mask
    by_site: dict[str, list[HookFn]] = {}
    if use_model_hooks:
        for site in model._registry.names():
            by_site.setdefault(site, []).extend(model._registry.fns(site))
    for name, fn in fwd_hooks:
        for site in model.resolve(name if callable(name) else [name]):
            by_site.setdefault(site, []).append(fn)
    placed = {site: _module_for(model, site) for site in by_site}  # raises before anything is attached
    handles = []
    try:
        for site, (path, kind) in placed.items():
            module: nn.Module = model.hf_model.get_submodule(path)
            heads = model.cfg.n_heads if template(site) == "blocks.{L}.attn.hook_z" else None
            apply = _wrap(site, by_site[site], heads)
            handles.append(module.register_forward_pre_hook(_pre(apply), with_kwargs=True) if kind == "pre"
                           else module.register_forward_hook(_post(apply)))
        hf_kwargs.setdefault("do_sample", False)
        tok = model.tokenizer
        if tok is not None and "pad_token_id" not in hf_kwargs:
            hf_kwargs["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = model.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          **hf_kwargs)
    finally:
        for h in handles:
            h.remove()
    if text_in:
        texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if isinstance(input, str) else texts
    return out
