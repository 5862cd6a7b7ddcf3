"""Weight processing (fold norms, centre writing weights / unembed): outputs unchanged, weights as TL's."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens
from tests.conftest import CONFIGS, FAMILIES, VOCAB, tokens, traced

CAUSAL = [f for f in FAMILIES if f not in ("bert", "roberta")]
SOFTCAPPED = {"gemma2"}  # final logit soft-capping: centring the unembedding is not softmax-invariant


def _processed(family):
    m = traced(family)
    return m, m.process_weights(center_unembed=family not in SOFTCAPPED)


@pytest.mark.parametrize("family", CAUSAL)
def test_processed_model_keeps_log_probs_and_logit_differences(family):
    m, p = _processed(family)
    ids = tokens(2, 9)
    before = m(ids)
    a, b = before, p(ids)
    torch.testing.assert_close(b.log_softmax(-1), a.log_softmax(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(b - b.mean(-1, keepdim=True), a - a.mean(-1, keepdim=True), atol=1e-4, rtol=0)
    diff = (a[..., 5] - a[..., 7]) - (b[..., 5] - b[..., 7])
    assert diff.abs().max() < 1e-4
    torch.testing.assert_close(m(ids), before, atol=0, rtol=0)  # the original model is untouched
    assert p.cfg.normalization_type == m.cfg.normalization_type + "Pre"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_center_unembed_raw_logits_match(family):
    m = traced(family)
    p = m.process_weights(center_unembed=False)
    ids = tokens(2, 9)
    torch.testing.assert_close(p(ids), m(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "phi3"])
def test_folded_norms_output_the_bare_normalised_vector(family):
    m, p = _processed(family)
    _, c = p.run_with_cache(tokens(2, 9))
    lnpre = p.cfg.normalization_type == "LNPre"
    for L in range(p.cfg.n_layers):
        x = c[f"blocks.{L}.hook_resid_pre"]
        x = x - x.mean(-1, keepdim=True) if lnpre else x
        torch.testing.assert_close(c[f"blocks.{L}.ln1.hook_out"], x / c[f"blocks.{L}.ln1.hook_scale"],
                                   atol=1e-5, rtol=1e-5)
    assert (p.W_Q - m.W_Q).abs().max() > 1e-3  # the norm weights went into W_Q
    w, b = p.ln_final_affine()
    torch.testing.assert_close(w, torch.ones_like(w), atol=1e-5, rtol=0)
    assert b.abs().max() < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt"])
def test_layernorm_models_have_centred_writing_weights_and_unembed(family):
    m, p = _processed(family)
    assert p.processing == {"fold_ln": True, "center_writing_weights": True, "center_unembed": True,
                            "fold_value_biases": False}
    for W in (p.W_E, p.W_O, p.b_O, p.W_out, p.b_out):
        assert W.mean(-1).abs().max() < 1e-5
    assert p.W_U.mean(-1).abs().max() < 1e-5
    assert m.W_O.mean(-1).abs().max() > 1e-3  # the original was not centred


def test_tied_embeddings_are_untied_in_the_copy():
    _, kw = CONFIGS["llama"]
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=VOCAB, tie_word_embeddings=True, **kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    m = fxlens.trace(hf, graph_cache=False)
    assert m.W_U.data_ptr() == m.W_E.data_ptr()
    p = m.process_weights()
    assert p.W_U.data_ptr() != p.W_E.data_ptr()
    torch.testing.assert_close(p.W_E, m.W_E, atol=0, rtol=0)  # RMSNorm: embeddings are not centred
    assert p.W_U.mean(-1).abs().max() < 1e-6
    assert m.W_U.data_ptr() == m.W_E.data_ptr()  # the original stays tied


def test_unsupported_requests_raise():
    with pytest.raises(ValueError, match="needs LayerNorm"):
        traced("llama").process_weights(center_writing_weights=True)
    with pytest.raises(ValueError, match="soft-capping"):
        traced("gemma2").process_weights()
    with pytest.raises(ValueError, match="cannot fold"):
        traced("bert").process_weights(center_unembed=False)  # post-norm: the residual add reads the norm
