"""Interventions on the real SmolLM2-135M checkpoint (slow: loads the model)."""

from __future__ import annotations

import pytest
import torch

import fxlens
from fxlens.interventions import analysis as A
from fxlens.interventions import patching as P

pytestmark = pytest.mark.slow

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(scope="module")
def smol():
    return fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))


def test_weights_reproduce_sites(smol):
    m = smol
    _, c = m.run_with_cache(CLEAN)
    for L in (0, 17, 29):
        x = c[f"blocks.{L}.ln1.hook_normalized"]
        torch.testing.assert_close(torch.einsum("bsm,hmd->bshd", x, m.W_Q[L]), c[f"blocks.{L}.attn.hook_q"],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.einsum("bsm,hmd->bshd", x, m.W_K_kv[L]), c[f"blocks.{L}.attn.hook_k"],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.einsum("bshd,hdm->bsm", c[f"blocks.{L}.attn.hook_z"], m.W_O[L]),
                                   c[f"blocks.{L}.hook_attn_out"], atol=1e-4, rtol=1e-4)


def test_wavefront_matches_loop_and_dla_sums(smol):
    m = smol
    clean, corrupted = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    mary, john = m.to_single_token(" Mary"), m.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    names = [f"blocks.{L}.hook_resid_pre" for L in (0, 12, 21, 29)] + ["blocks.22.hook_attn_out"]
    logits, cache = m.run_with_cache(clean)
    ref = P.patch_sweep(m, corrupted, cache, metric, names, schedule="loop", progress=False)
    got = P.patch_sweep(m, corrupted, cache, metric, names, schedule="wavefront", logits_at=-1, progress=False)
    assert (got - ref).abs().max().item() <= 1e-4
    stack = A.get_full_resid_decomposition(cache, m, expand_neurons=False, apply_ln=True, pos_slice=-1)
    dla = A.scaled_logit_attrs(m, stack, mary, john).sum(0)
    assert abs(dla.item() - metric(logits).item()) < 1e-3


def test_greedy_generation_equals_hf(smol):
    m = smol
    ids = m.to_tokens("The capital of France is")
    ours = m.generate(ids, max_new_tokens=8, do_sample=False)
    ref = m.hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=m.tokenizer.eos_token_id)
    assert torch.equal(ours, ref)


def test_processed_weights_keep_the_ioi_logit_difference(smol):
    m = smol
    # fold RMSNorm weights (tied embeddings untied), centre the unembedding, as TL's from_pretrained does
    p = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"), fold_ln=True, center_unembed=True)
    clean = m.to_tokens(CLEAN)
    mary, john = m.to_single_token(" Mary"), m.to_single_token(" John")
    a, b = m(clean), p(clean)
    torch.testing.assert_close(b.log_softmax(-1), a.log_softmax(-1), atol=1e-3, rtol=0)
    d_a, d_b = a[0, -1, mary] - a[0, -1, john], b[0, -1, mary] - b[0, -1, john]
    assert abs(d_a - d_b) < 1e-3 and d_a > 5
    assert p.W_U.mean(-1).abs().max() < 1e-5 and p.cfg.normalization_type == "RMSPre"
