"""Cache analyses: components sum to the residual stream; DLA sums to the logit difference."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions import analysis as A
from tests.conftest import tokens, traced

DECOMPOSABLE = ["llama", "gpt2", "gpt_neox", "opt", "gemma", "phi3"]


def _run(family):
    m = traced(family)
    ids = tokens(2, 6)
    logits, cache = m.run_with_cache(ids)
    return m, ids, logits, cache


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", DECOMPOSABLE)
def test_decompositions_sum_to_the_residual_stream(family):
    m, _, _, c = _run(family)
    n = m.cfg.n_layers
    final = c[f"blocks.{n - 1}.hook_resid_post"]
    for layer in range(n + 1):
        target = c[f"blocks.{layer}.hook_resid_pre"] if layer < n else final
        close(A.decompose_resid(c, m, layer).sum(0), target)
        close(A.get_full_resid_decomposition(c, m, layer, expand_neurons=True).sum(0), target)
        close(A.get_full_resid_decomposition(c, m, layer, expand_neurons=False).sum(0), target)
    heads = A.compute_head_results(c, m)["blocks.1.attn.hook_result"]
    close(heads.sum(-2) + m.b_O[1], c["blocks.1.hook_attn_out"])


def test_labels_and_accumulated_resid():
    m, _, _, c = _run("gpt2")
    stack, labels = A.accumulated_resid(c, m, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    close(stack[2], c["blocks.1.hook_resid_pre"])
    _, labels = A.decompose_resid(c, m, return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    _, labels = A.get_full_resid_decomposition(c, m, expand_neurons=False, return_labels=True)
    assert labels[:2] == ["L0H0", "L0H1"] and labels[-1] == "bias" and len(labels) == 2 * 4 + 2 + 2 + 1
    assert A.accumulated_resid(c, m, layer=1, pos_slice=-1).shape == (1, 2, m.cfg.d_model)


@pytest.mark.parametrize("family", DECOMPOSABLE)
def test_direct_logit_attribution_sums_to_the_logit_difference(family):
    m, ids, logits, c = _run(family)
    a, b = torch.tensor([5, 9]), torch.tensor([7, 11])  # per batch row
    diff = logits[:, -1].gather(-1, a[:, None])[:, 0] - logits[:, -1].gather(-1, b[:, None])[:, 0]
    stack = A.get_full_resid_decomposition(c, m, apply_ln=True, pos_slice=-1)
    attrs = A.logit_attrs(m, stack, a, b)
    assert attrs.shape == (stack.shape[0], 2)
    close(attrs.sum(0) + A.logit_bias_terms(m, a, b), diff)
    # the accumulated residual at the end attributes the whole difference too
    acc = A.accumulated_resid(c, m, apply_ln=True, pos_slice=-1)
    close(A.logit_attrs(m, acc[-1:], a, b)[0] + A.logit_bias_terms(m, a, b), diff)


def test_post_norm_branches_refuse_linear_decomposition():
    m, _, _, c = _run("gemma2")
    with pytest.raises(ValueError, match="not linear"):
        A.stack_head_results(c, m)
    with pytest.raises(KeyError, match="lacks"):
        A.accumulated_resid(c.__class__({}), traced("llama"))


def test_cache_methods_equal_the_functions_tl_style():
    """``cache.accumulated_resid(...)`` etc., as TransformerLens users call them, give the functions' values."""
    m, ids, logits, c = _run("llama")
    assert c.model is m
    close(c.accumulated_resid(incl_mid=True, apply_ln=True, pos_slice=-1),
          A.accumulated_resid(c, m, incl_mid=True, apply_ln=True, pos_slice=-1))
    close(c.decompose_resid(1, mode="attn"), A.decompose_resid(c, m, 1, mode="attn"))
    close(c.stack_neuron_results(1), A.stack_neuron_results(c, m, 1))
    stack, labels = c.get_full_resid_decomposition(apply_ln=True, pos_slice=-1, return_labels=True)
    assert labels[-1] == "bias" and stack.shape[0] == len(labels)
    attrs = c.logit_attrs(stack, 5, 7)
    close(attrs.sum(0) + A.logit_bias_terms(m, 5, 7), logits[:, -1, 5] - logits[:, -1, 7])
    heads = c.stack_head_results(layer=1, apply_ln=True, pos_slice=-1)
    close(heads, c.apply_ln_to_stack(c.stack_head_results(layer=1, pos_slice=-1), layer=1, pos_slice=-1))
    assert "result" not in [k.split(".")[-1] for k in c]
    c.compute_head_results()  # in place, as in TL
    close(c["result", 1].sum(-2) + m.b_O[1], c["attn_out", 1])
    close(c.to("cpu").accumulated_resid(), c.accumulated_resid())
    with pytest.raises(ValueError, match="no model attached"):
        c.__class__(dict(c)).accumulated_resid()
    with pytest.raises(ValueError, match="batch dim"):
        m.run_with_cache(ids[:1], remove_batch_dim=True)[1].decompose_resid()
