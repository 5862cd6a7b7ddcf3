"""Generation with hooks: HF ``generate`` (KV cache) with hooks at the HF module boundaries.

Re-running the prefix through the captured graph at every step is ~3x slower than HF's
cached decoding, so generation uses the HF model with PyTorch module hooks placed at the
module boundary equivalent to each site (``blocks.L.hook_resid_pre`` = the input of block
``L``, ``hook_attn_out`` = the output of the attention projection, ...). Sites that exist
only inside the graph (attention scores/pattern, rotary q/k, norm scales, split inputs)
cannot be honoured there and raise.

With the KV cache, step ``t > 0`` runs only the new token: a hook sees ``[batch, 1, ...]``,
and ``hook.pos_offset`` tells how many positions came before the current call (patches with
``pos=`` use it, so their positions are absolute). Before a site is used, its module boundary is
checked once against the graph's site value: a model that scales a tensor after its module
(Granite's multipliers, Gemma's embedding scale) raises instead of hooking the wrong tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..hooks import HookFn, HookPoint, check_result
from ..tracer.sites import layer_of, template

#: site template -> (module attribute of the family rule, "pre" | "post", reshape to heads?)
_SUPPORTED = {
    "blocks.{L}.hook_resid_pre": ("", "pre"),
    "blocks.{L}.hook_resid_post": ("", "post"),
    "blocks.{L}.hook_attn_out": ("attn_out", "post"),
    "blocks.{L}.hook_mlp_out": ("mlp_out", "post"),
    "blocks.{L}.attn.hook_z": ("attn_out", "pre"),
    "blocks.{L}.mlp.hook_pre": ("mlp_act", "pre"),
    "blocks.{L}.mlp.hook_post": ("mlp_out", "pre"),
    "blocks.{L}.ln1.hook_out": ("ln1", "post"),
    "blocks.{L}.ln2.hook_out": ("ln2", "post"),
    "ln_final.hook_out": ("ln_final", "post"),
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
    sites = model.sites
    if sites[name].layout == "flat":
        raise ValueError(f"{name}: in this {fam.name} model the module sees flattened [batch*pos, ...] rows, so it "
                         "cannot be hooked during generation; hook the residual stream instead")
    path = fam.block(L, rel) if L is not None else rel
    return path, kind


def _wrap(name: str, fns: list[HookFn], heads: int | None, point: HookPoint) -> Callable:
    """The site's hooks on the module tensor; ``point.pos_offset`` counts the positions seen before."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        view = x.unflatten(-1, (heads, -1)) if heads else x
        for fn in fns:
            view = check_result(fn, name, view, fn(view, hook=point))
        point.pos_offset += x.shape[1]
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


def _attach(model, placed: dict[str, tuple[str, str]], fns: dict[str, list[HookFn]], points: dict) -> list:
    handles = []
    for site, (path, kind) in placed.items():
        module: nn.Module = model.hf_model.get_submodule(path)
        heads = model.cfg.n_heads if template(site) == "blocks.{L}.attn.hook_z" else None
        apply = _wrap(site, fns[site], heads, points[site])
        handles.append(module.register_forward_pre_hook(_pre(apply), with_kwargs=True) if kind == "pre"
                       else module.register_forward_hook(_post(apply)))
    return handles


def _check_boundary(model, site: str, where: tuple[str, str]) -> None:
    """Raise unless the module boundary holds exactly the site's tensor (checked once per site)."""
    def probe() -> float:
        ids = torch.arange(3, 8, device=model.device)[None] % model.cfg.d_vocab
        seen: list[torch.Tensor] = []
        handles = _attach(model, {site: where}, {site: [lambda x, hook: seen.append(x.detach().clone())]},
                          {site: HookPoint(site)})
        try:
            with torch.no_grad():
                model.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
                ref = model.run(ids, names=[site], use_model_hooks=False).cache[site]
        finally:
            for h in handles:
                h.remove()
        if len(seen) != 1 or seen[0].shape != ref.shape:
            return float("inf")
        return float((seen[0].float() - ref.float()).abs().max() / (1 + ref.float().abs().max()))

    err = model.memo(("generate_boundary", site), probe)
    if err > 1e-5:
        raise ValueError(f"{site} cannot be hooked during generation in this {model.cfg.family} model: the HF module "
                         f"boundary {where[0]} ({where[1]}) holds a different tensor than the site (relative "
                         f"max-abs {err:.3g}; the model scales it after the module). Hook a residual-stream site "
                         "instead, or use run_with_hooks.")


class _FreqPenalty:
    """TransformerLens' ``freq_penalty``: subtract ``penalty x count`` of each token generated so far."""

    def __init__(self, penalty: float, start: int):
        self.penalty, self.start = penalty, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.start:]
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.penalty * counts


def generate(model, input, max_new_tokens: int = 10, stop_at_eos: bool = True, eos_token_id: int | None = None,
             do_sample: bool = True, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
             freq_penalty: float = 0.0, use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
             padding_side: str | None = "left", return_type: str = "input", verbose: bool = False, *,
             fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]] = (),
             use_model_hooks: bool = True, attention_mask=None, **hf_kwargs) -> torch.Tensor | str | list[str]:
    """Generate with HF ``generate`` (KV cache), applying hooks at every step; TransformerLens' signature.

    A hook sees the same tensor as at the forward's site (checked once per site against the
    graph); with the KV cache a step holds only the new positions, and ``hook.pos_offset`` says
    how many came before, so patches with ``pos=`` act on absolute positions.

    Args:
        model: a :class:`~fxlens.HookedModel` of a causal LM.
        input: a string, a list of strings (padded on ``padding_side``) or token ids ``[batch, pos]``.
        max_new_tokens: tokens to add.
        stop_at_eos / eos_token_id: stop a row at EOS (default: the tokenizer's).
        do_sample / top_k / top_p / temperature: sampling (TransformerLens defaults: sampling on).
        freq_penalty: subtract ``freq_penalty x count`` from each generated token's logit.
        use_past_kv_cache: decode with the KV cache (else each step re-runs every position).
        return_type: ``"input"`` (the input's kind), ``"str"`` or ``"tokens"``.
        fwd_hooks: ``[(name or predicate, fn(x, hook))]`` as in ``run_with_hooks``.
        use_model_hooks: also apply the hooks active on the model (``add_hook``, ``with model.patch``).
        **hf_kwargs: passed to HF ``generate``.
    """
    if model.output_kind != "logits":
        raise ValueError("generate needs a causal LM (*ForCausalLM); this model returns hidden states")
    if return_type not in ("input", "str", "tokens"):
        raise ValueError(f"return_type must be 'input', 'str' or 'tokens', not {return_type!r}")
    text_in = isinstance(input, str) or (isinstance(input, list) and bool(input) and isinstance(input[0], str))
    if text_in:
        ids, mask = model.to_tokens_and_mask(input, prepend_bos=prepend_bos, padding_side=padding_side)
    else:
        ids = torch.as_tensor(input, device=model.device)
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device)
    by_site: dict[str, list[HookFn]] = {}
    if use_model_hooks:
        for site, fn in model.active_hooks("fwd"):
            by_site.setdefault(site, []).append(fn)
    for h in model.hook_entries(fwd_hooks, "fwd"):
        by_site.setdefault(h.site, []).append(h.fn)
    placed = {site: _module_for(model, site) for site in by_site}  # raises before anything is attached
    for site, where in placed.items():
        _check_boundary(model, site, where)
    points = {site: HookPoint(site) for site in placed}
    for p in points.values():
        p.generating = True
    gen = copy.deepcopy(model.hf_model.generation_config)
    tok = model.tokenizer
    eos = eos_token_id if eos_token_id is not None else (tok.eos_token_id if tok is not None else gen.eos_token_id)
    gen.eos_token_id = eos if stop_at_eos else None
    if gen.pad_token_id is None:
        gen.pad_token_id = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else eos) or 0
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    if freq_penalty:
        from transformers import LogitsProcessorList

        hf_kwargs["logits_processor"] = LogitsProcessorList([_FreqPenalty(freq_penalty, ids.shape[1])])
    handles = _attach(model, placed, by_site, points)
    try:
        model.ensure_fresh()
        with torch.no_grad():
            # Settings go in the config: HF deprecates passing them beside `generation_config`.
            gen.update(max_new_tokens=max_new_tokens, use_cache=use_past_kv_cache, **sampling)
            out = model.hf_model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **hf_kwargs)
    finally:
        for h in handles:
            h.remove()
    if return_type == "str" or (return_type == "input" and text_in):
        texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
        return texts[0] if isinstance(input, str) else texts
    return out
