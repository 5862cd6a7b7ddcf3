"""Every claimed family: no-hook output, attention patterns and residual sites equal HF's."""

from __future__ import annotations

import torch

from fxlens.tracer.sites import spec
from tests.conftest import tokens, traced

TOL = 1e-5


def _hf(model, ids, **kw):
    with torch.no_grad():
        return model.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)


def test_no_hook_output_equals_hf(family):
    m = traced(family)
    ids = tokens(3, 9)
    ref = _hf(m, ids)
    ref = ref.logits if m.output_kind == "logits" else ref.last_hidden_state
    assert (m(ids) - ref).abs().max().item() <= TOL


def test_pattern_equals_hf_eager_attentions(family):
    m = traced(family)
    ids = tokens(2, 6)
    _, cache = m.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    impl = m.hf_model.config._attn_implementation
    m.hf_model.set_attn_implementation("eager")
    try:
        ref = _hf(m, ids, output_attentions=True).attentions
    finally:
        m.hf_model.set_attn_implementation(impl)
    assert len(ref) == m.cfg.n_layers
    for L, attn in enumerate(ref):
        assert (cache["pattern", L] - attn).abs().max().item() <= TOL


def test_residual_sites_equal_hf_hidden_states(family):
    m = traced(family)
    ids = tokens(2, 6)
    _, cache = m.run_with_cache(ids)
    hs = _hf(m, ids, output_hidden_states=True).hidden_states
    n = m.cfg.n_layers
    assert (cache["resid_pre", 0] - hs[0]).abs().max().item() <= TOL
    if m.family.post_norm:  # BERT: a block's output is its ln2 output
        for L in range(n):
            assert (cache[f"blocks.{L}.ln2.hook_out"] - hs[L + 1]).abs().max().item() <= TOL
        return
    for L in range(n - 1):
        assert (cache["resid_post", L] - hs[L + 1]).abs().max().item() <= TOL
    # HF's last entry is the final-normed output, not the last block's residual
    assert (cache["ln_final.hook_out"] - hs[n]).abs().max().item() <= TOL


def test_site_shapes_follow_the_catalogue(family):
    m = traced(family)
    ids = tokens(2, 5)
    _, cache = m.run_with_cache(ids)
    c = m.cfg
    dims = {"batch": 2, "pos": 5, "q_pos": 5, "k_pos": 5, "d_model": c.d_model, "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads, "d_head": c.d_head, "d_mlp": c.d_mlp, "1": 1}
    assert set(cache) == set(m.hook_names)
    split = [n for n in m.all_hook_names if n not in m.hook_names]
    assert len(split) == 4 * m.cfg.n_layers  # attn_in, q/k/v_input: opt-in, as in TransformerLens
    _, split_cache = m.run_with_cache(ids, names_filter=split)
    cache = {**cache, **split_cache}
    for name, value in cache.items():
        shape = spec(name).shape.strip("[]").split(", ")
        if name == "hook_pos_embed":
            shape[0] = "batch" if value.shape[0] == 2 else "1"
        assert tuple(value.shape) == tuple(dims[d] for d in shape), name


def test_gqa_keys_have_kv_heads():
    m = traced("llama")
    _, cache = m.run_with_cache(tokens(1, 4), names_filter=["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"])
    assert cache["k", 0].shape[2] == m.cfg.n_kv_heads == 2
    assert cache["q", 0].shape[2] == m.cfg.n_heads == 4


def test_q_site_is_the_projection_split_into_heads():
    m = traced("llama")
    ids = tokens(1, 4)
    _, cache = m.run_with_cache(ids, names_filter=["blocks.1.attn.hook_q", "blocks.1.ln1.hook_out"])
    q_proj = m.hf_model.model.layers[1].self_attn.q_proj
    expected = q_proj(cache["blocks.1.ln1.hook_out"]).unflatten(-1, (4, 8))
    assert torch.allclose(cache["q", 1], expected, atol=1e-6)


def test_scale_sites_match_their_definition(family):
    m = traced(family)
    ids = tokens(2, 5)
    _, cache = m.run_with_cache(ids, names_filter=["blocks.0.ln1.hook_scale", "blocks.0.hook_resid_pre"])
    x = cache["resid_pre", 0]
    if m.family.post_norm:
        return  # BERT's ln1 reads resid_mid; covered by the shape test
    hf = m.hf_model.config
    keys = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon")
    eps = next((getattr(hf, k) for k in keys if hasattr(hf, k)), None)
    if eps is None or m.cfg.family == "opt":
        eps = 1e-5  # OPT and OLMo use nn.LayerNorm's default eps
    ref = ((x.var(-1, keepdim=True, unbiased=False) if m.cfg.normalization_type == "LN"
            else x.pow(2).mean(-1, keepdim=True)) + eps).sqrt()
    assert torch.allclose(cache["blocks.0.ln1.hook_scale"], ref, rtol=1e-4, atol=1e-4)
