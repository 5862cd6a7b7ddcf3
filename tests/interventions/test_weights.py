"""TransformerLens-layout weights read from HF parameters, checked against cached sites."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES, tokens, traced

POST_NORM_BRANCHES = {"gemma2", "gemma3"}  # attn/mlp outputs pass a post-norm before the residual add


def _attn_input(m, cache, L):
    return cache[f"blocks.{L}.hook_resid_pre"] if m.family.post_norm else cache[f"blocks.{L}.ln1.hook_out"]


def _mlp_input(m, cache, L):
    if m.family.post_norm:
        return cache[f"blocks.{L}.ln1.hook_out"]
    return cache[f"blocks.{L}.ln2.hook_out" if m.family.ln2 else f"blocks.{L}.ln1.hook_out"]


@pytest.mark.parametrize("family", FAMILIES)
def test_qkv_weights_reproduce_cached_q_k_v(family):
    m = traced(family)
    _, c = m.run_with_cache(tokens(2, 6))
    for L in range(m.cfg.n_layers):
        x = _attn_input(m, c, L)
        for w, W, b in (("q", m.W_Q, m.b_Q), ("k", m.W_K_kv, m.b_K_kv), ("v", m.W_V_kv, m.b_V_kv)):
            got = torch.einsum("bsm,hmd->bshd", x, W[L]) + b[L]
            torch.testing.assert_close(got, c[f"blocks.{L}.attn.hook_{w}"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in POST_NORM_BRANCHES])
def test_output_and_mlp_weights_reproduce_cached_outputs(family):
    m = traced(family)
    ids = tokens(2, 6)
    logits, c = m.run_with_cache(ids)
    for L in range(m.cfg.n_layers):
        attn = torch.einsum("bshd,hdm->bsm", c[f"blocks.{L}.attn.hook_z"], m.W_O[L]) + m.b_O[L]
        torch.testing.assert_close(attn, c[f"blocks.{L}.hook_attn_out"], atol=1e-5, rtol=0)
        x = _mlp_input(m, c, L)
        first = m.W_gate if m.family.gated else m.W_in
        first_b = m.b_gate if m.family.gated else m.b_in
        torch.testing.assert_close(x @ first[L] + first_b[L], c[f"blocks.{L}.mlp.hook_pre"], atol=1e-5, rtol=0)
        if m.family.gated:
            torch.testing.assert_close(x @ m.W_in[L] + m.b_in[L], c[f"blocks.{L}.mlp.hook_pre_linear"],
                                       atol=1e-5, rtol=0)
        out = c[f"blocks.{L}.mlp.hook_post"] @ m.W_out[L] + m.b_out[L]
        torch.testing.assert_close(out, c[f"blocks.{L}.hook_mlp_out"], atol=1e-5, rtol=0)
    if m.output_kind == "logits":
        torch.testing.assert_close(c["ln_final.hook_out"] @ m.W_U + m.b_U, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_shapes_views_and_gqa_repeat(family):
    m = traced(family)
    c = m.cfg
    assert m.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K.shape == m.W_V.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)
    assert m.W_K_kv.shape == (c.n_layers, c.n_kv_heads, c.d_model, c.d_head)
    assert m.W_O.shape == (c.n_layers, c.n_heads, c.d_head, c.d_model)
    assert m.W_in.shape == (c.n_layers, c.d_model, c.d_mlp) and m.W_out.shape == (c.n_layers, c.d_mlp, c.d_model)
    assert m.W_E.shape == (c.d_vocab, c.d_model) and m.W_U.shape == (c.d_model, c.d_vocab)
    group = c.n_heads // c.n_kv_heads
    for h in range(c.n_heads):
        assert torch.equal(m.W_K[:, h], m.W_K_kv[:, h // group])
    # per-layer weights are views of the HF parameters (no copy): check storage sharing
    W, _ = m._qkv(0, "q")
    params = {p.untyped_storage().data_ptr() for p in m.hf_model.parameters()}
    assert W.untyped_storage().data_ptr() in params
    assert m.W_E.data_ptr() == m.hf_model.get_input_embeddings().weight.data_ptr()


def test_stacked_weights_follow_parameter_updates():
    m = traced("llama")
    before = m.W_Q.clone()
    p = m.hf_model.get_submodule(m._layout().qkv_module["0.q"]).weight
    with torch.no_grad():
        p.add_(1.0)
        try:
            assert not torch.equal(m.W_Q, before)
        finally:
            p.sub_(1.0)
    torch.testing.assert_close(m.W_Q, before)


def test_positional_embedding_and_missing_gate():
    g = traced("gpt2")
    assert torch.equal(g.W_pos, g.hf_model.transformer.wpe.weight)
    with pytest.raises(AttributeError, match="not gated"):
        g.W_gate  # noqa: B018
    with pytest.raises(AttributeError, match="rotary"):
        traced("llama").W_pos  # noqa: B018


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_final_norm_affine_reproduces_ln_final(family):
    m = traced(family)
    _, c = m.run_with_cache(tokens(2, 5), names_filter=lambda n: n.startswith("ln_final") or "resid_post" in n)
    x = c[f"blocks.{m.cfg.n_layers - 1}.hook_resid_post"]
    if m.cfg.normalization_type == "LN":
        x = x - x.mean(-1, keepdim=True)
    w, b = m.ln_final_affine()
    torch.testing.assert_close(x / c["ln_final.hook_scale"] * w + b, c["ln_final.hook_out"],
                               atol=1e-5, rtol=1e-5)


def test_ov_and_qk_circuits():
    m = traced("llama")
    ov, qk = m.OV, m.QK
    c = m.cfg
    assert ov.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model)
    torch.testing.assert_close(ov.AB[1, 2], m.W_V[1, 2] @ m.W_O[1, 2])
    torch.testing.assert_close(qk.AB[0, 3], m.W_Q[0, 3] @ m.W_K[0, 3].T)
