"""Cache analyses with TransformerLens' semantics, checked against exact identities.

References that do not come from the analysis code: the HF model's own logits, the cached residual
streams (components must sum to them), hand-written norms with the HF config's eps, and einsums.
"""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions import analysis as A
from tests.conftest import tokens, traced

DECOMPOSABLE = ["llama", "gpt2", "gpt_neox", "opt", "gemma", "phi3"]


def _run(family, batch=2, pos=6):
    m = traced(family)
    ids = tokens(batch, pos)
    _, cache = m.run_with_cache(ids)
    with torch.no_grad():
        hf_logits = m.hf_model(ids).logits
    return m, ids, hf_logits, cache


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", DECOMPOSABLE)
def test_decompositions_sum_to_the_residual_stream(family):
    m, _, _, c = _run(family)
    n = m.cfg.n_layers
    for layer in [*range(n + 1), None, -1]:
        L = n if layer in (None, -1) else layer
        target = c["resid_pre", L] if L < n else c["resid_post", n - 1]
        close(c.decompose_resid(layer).sum(0), target)
        close(c.get_full_resid_decomposition(layer, expand_neurons=True).sum(0), target)
        close(c.get_full_resid_decomposition(layer, expand_neurons=False).sum(0), target)
        close(c.stack_head_results(layer, incl_remainder=True).sum(0), c["resid_post", L - 1])
        if L < n and "blocks.0.hook_resid_mid" in c:  # the MLP's input
            close(c.decompose_resid(layer, mlp_input=True).sum(0), c["resid_mid", L])
            close(c.get_full_resid_decomposition(layer, mlp_input=True).sum(0), c["resid_mid", L])
            close(c.get_full_resid_decomposition(layer, mlp_input=True, expand_neurons=False).sum(0),
                  c["resid_mid", L])
    close(c.stack_neuron_results(1, incl_remainder=True).sum(0), c["resid_post", 0])
    heads = A.compute_head_results(c, m)["blocks.1.attn.hook_result"]
    close(heads.sum(-2) + m.b_O[1], c["attn_out", 1])


def test_layer_minus_one_and_none_mean_n_layers_with_tl_labels():
    m, _, _, c = _run("gpt2")
    n = m.cfg.n_layers
    for layer in (None, -1, n):
        _, labels = c.accumulated_resid(layer, incl_mid=True, return_labels=True)
        assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
        assert c.stack_head_results(layer).shape[0] == n * m.cfg.n_heads
        assert c.stack_neuron_results(layer).shape[0] == n * m.cfg.d_mlp
        assert c.stack_activation("resid_pre", layer).shape[0] == n
    _, labels = c.accumulated_resid(1, return_labels=True)
    assert labels == ["0_pre", "1_pre"]  # up to and including layer 1's input (TL)
    _, labels = c.accumulated_resid(1, mlp_input=True, return_labels=True)
    assert labels == ["0_pre", "1_pre", "1_mid"]
    _, labels = c.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    _, labels = c.decompose_resid(1, mlp_input=True, mode="attn", return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "1_attn_out"]
    _, labels = c.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert labels == [f"L{L}H{h}" for L in range(2) for h in range(4)] + [
        "0_mlp_out", "1_mlp_out", "embed", "pos_embed", "bias"]
    _, labels = c.stack_neuron_results(2, neuron_slice=[3, 5], return_labels=True)
    assert labels == ["L0N3", "L0N5", "L1N3", "L1N5"]
    _, labels = c.stack_head_results(1, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder"
    assert c.accumulated_resid(1, pos_slice=-1).shape == (2, 2, m.cfg.d_model)
    assert c.accumulated_resid(pos_slice=(1, 4)).shape == (3, 2, 3, m.cfg.d_model)
    torch.testing.assert_close(c.stack_activation("pattern"),
                               torch.stack([c["pattern", 0], c["pattern", 1]]))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\]"):
        c.accumulated_resid(-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_apply_ln_to_stack_uses_ln_final_for_minus_one(family):
    """Divide by the cached final scale: the normalised final residual, times w_ln_final (+ b), is the HF final norm."""
    m, _, _, c = _run(family)
    final = c["resid_post", -1]
    norm = m.hf_model.get_submodule(m.family.ln_final)
    w, b = norm.weight, getattr(norm, "bias", None)
    for layer in (-1, None, m.cfg.n_layers):
        x_hat = c.apply_ln_to_stack(final[None], layer)[0]
        close(x_hat * w + (b if b is not None else 0), norm(final))
    x_hat1 = c.apply_ln_to_stack(c["resid_pre", 1][None], 1)[0]
    ln1 = m.hf_model.get_submodule(m.family.block(1, m.family.ln1))
    close(x_hat1 * ln1.weight + (ln1.bias if getattr(ln1, "bias", None) is not None else 0), ln1(c["resid_pre", 1]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_accumulated_resid_apply_ln_is_the_logit_lens(family):
    """At the last layer, TL applies the final norm to each component with its own statistics; by hand here."""
    m, ids, hf_logits, c = _run(family)
    acc = c.accumulated_resid(apply_ln=True)
    norm = m.hf_model.get_submodule(m.family.ln_final)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    raw = c.accumulated_resid()
    if m.cfg.normalization_type.startswith("LN"):
        xc = raw - raw.mean(-1, keepdim=True)
        by_hand = xc / (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm.weight + norm.bias
    else:
        by_hand = raw / (raw.pow(2).mean(-1, keepdim=True) + eps).sqrt() * norm.weight
    close(acc, by_hand)
    close(acc[-1] @ m.W_U + m.b_U, hf_logits)
    # before the last layer: the cached scale of that layer's ln1
    close(c.accumulated_resid(1, apply_ln=True), c.apply_ln_to_stack(c.accumulated_resid(1), 1))


@pytest.mark.parametrize("family", DECOMPOSABLE)
def test_logit_attrs_scales_the_stack_and_sums_to_the_logit_difference(family):
    m, ids, hf_logits, c = _run(family)
    a, b = torch.tensor([5, 9]), torch.tensor([7, 11])  # per batch row
    last = hf_logits[:, -1]
    diff = last.gather(-1, a[:, None])[:, 0] - last.gather(-1, b[:, None])[:, 0]
    bias = A.logit_bias_terms(m, a, b)
    for stack in (c.decompose_resid(pos_slice=-1), c.get_full_resid_decomposition(pos_slice=-1),
                  c.accumulated_resid(pos_slice=-1)[-1:]):
        attrs = c.logit_attrs(stack, a, b, pos_slice=-1)
        assert attrs.shape == (stack.shape[0], 2)
        close(attrs.sum(0) + bias, diff)
    # the scaled stack through scaled_logit_attrs gives the same numbers
    scaled = c.get_full_resid_decomposition(pos_slice=-1, apply_ln=True)
    close(A.scaled_logit_attrs(m, scaled, a, b), c.logit_attrs(c.get_full_resid_decomposition(pos_slice=-1), a, b,
                                                                pos_slice=-1))
    # every position, one token pair per example: [n, batch, pos]
    full = c.decompose_resid()
    attrs = c.logit_attrs(full, a, b)
    assert attrs.shape == (full.shape[0], 2, ids.shape[1])
    d_all = hf_logits.gather(-1, a[:, None, None].expand(-1, ids.shape[1], 1))[..., 0] - hf_logits.gather(
        -1, b[:, None, None].expand(-1, ids.shape[1], 1))[..., 0]
    close(attrs.sum(0) + bias[:, None], d_all)
    # a single token pair (ints), and batch_slice
    close(c.logit_attrs(full, 5, 7).sum(0) + A.logit_bias_terms(m, 5, 7), hf_logits[..., 5] - hf_logits[..., 7])
    close(c.logit_attrs(full, 5, 7, batch_slice=[1]), c.logit_attrs(full, 5, 7)[:, [1]])
    close(c.logit_attrs(full, 5, 7, batch_slice=1), c.logit_attrs(full, 5, 7)[:, 1])


def test_logit_attrs_argument_checks():
    m, _, _, c = _run("llama")
    stack = c.decompose_resid(pos_slice=-1)
    with pytest.raises(ValueError, match="same shape"):
        c.logit_attrs(stack, torch.tensor([5, 9]), 7)
    with pytest.raises(TypeError, match="scaled_logit_attrs"):
        A.logit_attrs(m, stack, 5, 7)  # the old fxlens call, which took an already-normalised stack
    assert A.tokens_to_residual_directions(m, torch.tensor([5])).shape == (m.cfg.d_model,)  # as TL
    assert A.tokens_to_residual_directions(m, torch.tensor([[5, 6]])).shape == (1, 2, m.cfg.d_model)


def test_logit_attrs_accept_token_strings():
    from tests.explorer.tiny import tiny_model

    m = tiny_model("llama")
    ids = m.to_tokens("abcab")
    _, c = m.run_with_cache(ids)
    with torch.no_grad():
        logits = m.hf_model(ids).logits[0, -1]
    a, b = m.to_single_token("c"), m.to_single_token("b")
    attrs = c.logit_attrs(c.decompose_resid(pos_slice=-1), "c", "b", pos_slice=-1)
    close(attrs.sum(0) + A.logit_bias_terms(m, a, b), (logits[a] - logits[b]).reshape(1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_neuron_projections_equal_the_dense_products(family):
    m, _, _, c = _run(family)
    g = torch.Generator().manual_seed(0)
    p2 = torch.randn(m.cfg.d_model, 3, generator=g)
    p1 = p2[:, 0]
    dense = c.stack_neuron_results(2, pos_slice=-1)
    close(c.stack_neuron_results(2, pos_slice=-1, project_output_onto=p2), dense @ p2)
    close(c.stack_neuron_results(2, pos_slice=-1, project_output_onto=p1), dense @ p1)
    normed = c.stack_neuron_results(2, pos_slice=-1, apply_ln=True)
    close(c.stack_neuron_results(2, pos_slice=-1, apply_ln=True, project_output_onto=p2), normed @ p2)
    close(c.stack_neuron_results(1, apply_ln=True, incl_remainder=True, project_output_onto=p2),
          c.stack_neuron_results(1, apply_ln=True, incl_remainder=True) @ p2)
    full = c.get_full_resid_decomposition(pos_slice=-1)
    close(c.get_full_resid_decomposition(pos_slice=-1, project_output_onto=p2), full @ p2)
    close(c.get_full_resid_decomposition(pos_slice=-1, apply_ln=True, project_output_onto=p1),
          c.get_full_resid_decomposition(pos_slice=-1, apply_ln=True) @ p1)
    post, W = c["post", 0], m.W_out[0]
    close(c.get_neuron_results(0, neuron_slice=(2, 5)), post[..., 2:5, None] * W[2:5])


def test_analysis_on_a_cache_without_batch_dim():
    m = traced("gpt2")
    ids = tokens(1, 6)
    _, c = m.run_with_cache(ids)
    _, c1 = m.run_with_cache(ids, remove_batch_dim=True)
    assert not c1.has_batch_dim and c1["resid_pre", 0].shape == (6, m.cfg.d_model)
    close(c1.accumulated_resid(incl_mid=True, apply_ln=True), c.accumulated_resid(incl_mid=True, apply_ln=True)[:, 0])
    close(c1.decompose_resid(apply_ln=True, pos_slice=-1), c.decompose_resid(apply_ln=True, pos_slice=-1)[:, 0])
    close(c1.get_full_resid_decomposition(apply_ln=True), c.get_full_resid_decomposition(apply_ln=True)[:, 0])
    close(c1.stack_head_results(incl_remainder=True), c.stack_head_results(incl_remainder=True)[:, 0])
    close(c1.logit_attrs(c1.decompose_resid(), 5, 7), c.logit_attrs(c.decompose_resid(), 5, 7)[:, 0])


def test_post_norm_branches_refuse_head_decomposition():
    m, _, _, c = _run("gemma2")
    for layer in range(m.cfg.n_layers):  # branch outputs still sum to the stream
        close(c.decompose_resid(layer).sum(0), c["resid_pre", layer])
        close(c.decompose_resid(layer, mlp_input=True).sum(0), c["resid_mid", layer])
    with pytest.raises(ValueError, match="not linear"):
        c.stack_head_results()
    with pytest.raises(ValueError, match="not linear"):
        c.stack_neuron_results(1)
    with pytest.raises(KeyError, match="lacks"):
        A.accumulated_resid(c.__class__({}), traced("llama"))


def test_cache_methods_tl_style():
    m, ids, hf_logits, c = _run("llama")
    assert c.model is m
    close(c.decompose_resid(1, mode="attn"), A.decompose_resid(c, m, 1, mode="attn"))
    assert "blocks.1.attn.hook_result" not in c
    c.compute_head_results()  # in place, as in TL
    close(c["result", 1].sum(-2) + m.b_O[1], c["attn_out", 1])
    close(c.stack_head_results(), A.stack_head_results(c, m))  # uses the cached results
    with pytest.raises(ValueError, match="no model attached"):
        c.__class__(dict(c)).accumulated_resid()
    assert A.accumulated_bias(m, 2).shape == (m.cfg.d_model,)
    close(A.accumulated_bias(m, 1, mlp_input=True), m.b_O[0] + m.b_out[0] + m.b_O[1])
