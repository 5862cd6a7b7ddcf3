"""TransformerLens' model surface: HookedTransformer entry point, module tree, helper methods."""

from __future__ import annotations

import pytest
import torch

import fxlens
from fxlens import FactoredMatrix, HookedRootModule, HookedTransformer, HookPoint, evals, patching  # noqa: F401
from tests.conftest import tiny_hf, tokens, traced


def _logp(x):
    return torch.log_softmax(x.float(), -1)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_pretrained_with_hf_model_processes_weights_like_tl(family):
    hf = tiny_hf(family)
    ids = tokens(2, 6)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    with pytest.warns(UserWarning, match="no tokenizer"):
        m = HookedTransformer.from_pretrained("tiny-" + family, hf_model=hf, device="cpu")
    assert isinstance(m, HookedTransformer) and isinstance(m, HookedRootModule)
    assert m.processing["fold_ln"] and m.processing["center_unembed"] and m.processing["fold_value_biases"]
    assert m.processing["center_writing_weights"] == (family == "gpt2")  # LayerNorm only, as TL
    assert m.cfg.default_prepend_bos is True and m.cfg.normalization_type.endswith("Pre")
    with torch.no_grad():
        torch.testing.assert_close(_logp(m(ids)), _logp(ref), atol=1e-4, rtol=1e-4)
    if family == "gpt2":  # fold_value_biases moved every value bias into b_O
        assert m.b_V.abs().max() == 0


def test_no_processing_equals_hf_exactly():
    hf = tiny_hf("llama")
    ids = tokens(2, 6)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    with pytest.warns(UserWarning):
        m = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=hf, device="cpu")
    with torch.no_grad():
        assert (m(ids) - ref).abs().max().item() <= 1e-5


def test_module_tree_views_index_the_stacked_weights():
    m = traced("llama")
    assert torch.equal(m.blocks[1].attn.W_Q, m.W_Q[1]) and torch.equal(m.blocks[0].mlp.W_gate, m.W_gate[0])
    assert torch.equal(m.embed.W_E, m.W_E) and torch.equal(m.unembed.W_U, m.W_U)
    torch.testing.assert_close(m.ln_final.w, m.hf_model.model.norm.weight.detach())
    torch.testing.assert_close(m.blocks[0].ln1.w, m.hf_model.model.layers[0].input_layernorm.weight.detach())
    with pytest.raises(AttributeError, match="has no 'W_nope'"):
        m.blocks[0].attn.W_nope
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.hf_model.parameters())


def test_accumulated_bias_and_residual_directions():
    m = traced("gpt2")
    expect = m.b_O[0] + m.b_out[0] + m.b_O[1]
    torch.testing.assert_close(m.accumulated_bias(1, mlp_input=True), expect)
    torch.testing.assert_close(m.tokens_to_residual_directions(7), m.W_U[:, 7])
    assert m.tokens_to_residual_directions([3, 4]).shape == (2, m.cfg.d_model)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores_equal_the_dense_definition(mode):
    m = traced("gpt2")
    ov, qk = m.OV.AB, m.QK.AB
    right = {"Q": qk, "K": qk.transpose(-1, -2), "V": ov}[mode]
    got = m.all_composition_scores(mode)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    for a in range(L):
        for h in range(H):
            for b in range(L):
                for g in range(H):
                    dense = (ov[a, h] @ right[b, g]).norm() / ov[a, h].norm() / right[b, g].norm()
                    want = dense if a < b else torch.zeros(())
                    torch.testing.assert_close(got[a, h, b, g], want, atol=1e-5, rtol=1e-4)


def test_loss_fn_and_loss_per_token():
    m = traced("llama")
    ids = tokens(2, 6)
    with torch.no_grad():
        logits = m(ids)
        per = m(ids, return_type="loss", loss_per_token=True)
    assert per.shape == (2, 5)
    torch.testing.assert_close(per.mean(), m.loss_fn(logits, ids))
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(m.loss_fn(logits, ids), ref)


def test_hook_dict_points_are_what_hooks_receive():
    m = traced("gpt2")
    seen = []
    m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(hook))])
    assert seen[0] is m.hook_dict["blocks.0.hook_resid_pre"] and isinstance(seen[0], fxlens.HookPoint)


def test_use_attn_result_caches_hook_result_summing_to_attn_out():
    m = traced("llama")
    ids = tokens(2, 5)
    with pytest.raises(KeyError, match="set_use_attn_result"):
        m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_result"])
    m.set_use_attn_result(True)
    try:
        _, only = m.run_with_cache(ids, names_filter=["blocks.1.attn.hook_result"])
        assert list(only) == ["blocks.1.attn.hook_result"]
        assert only["result", 1].shape == (2, 5, m.cfg.n_heads, m.cfg.d_model)
        _, cache = m.run_with_cache(ids)
        for L in range(m.cfg.n_layers):
            torch.testing.assert_close(cache["result", L].sum(2) + m.b_O[L], cache["attn_out", L],
                                       atol=1e-5, rtol=1e-5)
        hooked = m.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: x)])
        assert (hooked - m(ids)).abs().max().item() < 1e-5  # hookable now (tests/compat/test_hook_result.py)
    finally:
        m.set_use_attn_result(False)


def test_loss_per_token_of_a_padded_batch_follows_tl():
    from fxlens import utils

    m = traced("llama")
    ids = tokens(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = m(ids, attention_mask=mask)
        per = m(ids, return_type="loss", loss_per_token=True, attention_mask=mask)
    ref = utils.lm_cross_entropy_loss(logits, ids, attention_mask=mask, per_token=True)  # TL's rule (tl_reference)
    torch.testing.assert_close(per, ref)
    assert per[0, :2].abs().max() == 0 and per[1].abs().min() > 0
