"""Norm sites hold TransformerLens' tensors: ``hook_normalized`` is the vector before the norm's
weight, ``hook_out`` the norm module's output; a hook on ``hook_normalized`` flows through the weight.

References come from forward hooks on the HF norm modules, not from fxlens' graph.
"""

from __future__ import annotations

import torch

from tests.conftest import tokens, traced

TOL = 1e-5


def _norms(m) -> list[str]:
    return [p for p in ("blocks.0.ln1", "blocks.1.ln2", "ln_final") if f"{p}.hook_normalized" in m.sites]


def _module(m, prefix: str) -> torch.nn.Module:
    return m.hf_model.get_submodule(m.sites[f"{prefix}.hook_normalized"].module)


def _eps(mod: torch.nn.Module) -> float:
    return next((getattr(mod, k) for k in ("eps", "variance_epsilon", "epsilon") if hasattr(mod, k)), 1e-5)


def _hf(m, ids, hooks: dict):
    """HF output with ``{module: forward hook}`` registered."""
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks.items()]
    try:
        with torch.no_grad():
            out = m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return out.logits if m.output_kind == "logits" else out.last_hidden_state


def test_normalized_is_the_input_over_the_scale_before_the_weight(family):
    m = traced(family)
    ids = tokens(2, 6)
    seen = {}
    hooks = {_module(m, p): (lambda mod, args, out, p=p: seen.__setitem__(p, (args[0], out))) for p in _norms(m)}
    _hf(m, ids, hooks)
    _, cache = m.run_with_cache(ids)
    for p, (x, out) in seen.items():
        x = x.float()
        if m.cfg.normalization_type.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + _eps(_module(m, p))).sqrt()
        normalized, hook_out = cache[f"{p}.hook_normalized"], cache[f"{p}.hook_out"]
        # OPT flattens [batch*pos, d_model] rows before its ln2: the sites are [batch, pos, d_model]
        torch.testing.assert_close(normalized, (x / scale).reshape(normalized.shape), atol=TOL, rtol=TOL, msg=p)
        torch.testing.assert_close(hook_out, out.reshape(hook_out.shape), atol=TOL, rtol=0, msg=p)
        if any(True for _ in _module(m, p).parameters()):  # weights not all 1: the two sites differ
            assert (hook_out - normalized).abs().max() > 1e-3, p


def test_normalized_hook_flows_through_the_weight(family):
    m = traced(family)
    ids = tokens(2, 6)
    prefixes = _norms(m)

    def doubled_input(mod, args, out):  # the norm's output had its normalised vector been doubled
        bias = getattr(mod, "bias", None)
        return 2 * out - (bias if bias is not None else 0)

    ref = _hf(m, ids, {_module(m, p): doubled_input for p in prefixes})
    with torch.no_grad():
        ours = m.run_with_hooks(ids, fwd_hooks=[(f"{p}.hook_normalized", lambda x, hook: 2 * x) for p in prefixes])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours - m(ids)).abs().max() > 1e-2  # the hook changed the output


def test_normalized_and_scale_hooks_compose(family):
    """Hooking both sites of one norm: the scale edit reaches the normalised vector, which the weight reads."""
    m = traced(family)
    ids = tokens(1, 5)
    p = _norms(m)[0]
    names = [f"{p}.hook_scale", f"{p}.hook_normalized", f"{p}.hook_out"]
    seen = {}
    hooks = [(f"{p}.hook_scale", lambda s, hook: 2 * s),
             (f"{p}.hook_normalized", lambda x, hook: seen.setdefault("x", x.clone()))]
    _, base = m.run_with_cache(ids, names_filter=names)
    with m.hooks(fwd_hooks=hooks):
        _, both = m.run_with_cache(ids, names_filter=names)
    torch.testing.assert_close(seen["x"], base[f"{p}.hook_normalized"] / 2, atol=TOL, rtol=TOL)
    bias = getattr(_module(m, p), "bias", None)
    bias = bias.detach() if bias is not None else 0
    torch.testing.assert_close(both[f"{p}.hook_out"], (base[f"{p}.hook_out"] - bias) / 2 + bias, atol=TOL, rtol=TOL)
