"""Analyses on families whose structure breaks their assumptions refuse with the reason (never a wrong number).

No pre-attention norm (OLMo 2: ``x + norm(attn(x))``), post-norm blocks (BERT), an embedding
LayerNorm before block 0 (Megatron-BERT), an in-place embedding scale (CTRL), a head transform
between the final norm and the LM head (Megatron-BERT).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import fxlens
from fxlens.check import check_sites
from fxlens.explorer import circuits
from fxlens.interventions.analysis import apply_ln_to_stack, decompose_resid, get_full_resid_decomposition
from tests.conftest import tokens, traced

_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _trace(model_type: str, **kw) -> fxlens.HookedModel:
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return fxlens.trace(hf.eval(), graph_cache=False)


@pytest.fixture(scope="module")
def olmo2() -> fxlens.HookedModel:
    return _trace("olmo2", **_LLAMA)


@pytest.fixture(scope="module")
def megatron() -> fxlens.HookedModel:
    return _trace("megatron-bert", is_decoder=True, **_ENC)


def test_no_pre_attention_norm_refuses_apply_ln(olmo2):
    assert olmo2.family.ln1 is None
    _, c = olmo2.run_with_cache(tokens(2, 6))
    stack = decompose_resid(c, olmo2, layer=1)  # exact: OLMo 2 adds the normed branch outputs
    torch.testing.assert_close(stack.sum(0), c["blocks.0.hook_resid_post"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="have no ln1 .*raw residual"):
        apply_ln_to_stack(c, olmo2, stack, layer=1)
    with pytest.raises(ValueError, match="have no ln2"):
        apply_ln_to_stack(c, olmo2, stack, layer=1, mlp_input=True)


def test_circuits_without_ln1_read_the_embeddings(olmo2):
    ids = torch.tensor([3, 5, 7])
    torch.testing.assert_close(circuits._inputs(olmo2, 0, ids), olmo2.W_E[ids].float())


def test_post_norm_blocks_have_no_additive_decomposition():
    m = traced("bert")
    _, c = m.run_with_cache(tokens(2, 6))
    with pytest.raises(ValueError, match="post-norm blocks"):
        decompose_resid(c, m)


def test_embedding_layernorm_refuses_the_embedding_terms(megatron):
    ids = tokens(2, 6)
    _, c = megatron.run_with_cache(ids)
    assert megatron.sites["hook_embed"].extra["sums_to_resid"] is False
    with pytest.raises(ValueError, match="embedding LayerNorm"):
        decompose_resid(c, megatron)
    with pytest.raises(ValueError, match="embedding LayerNorm"):
        get_full_resid_decomposition(c, megatron)
    parts = decompose_resid(c, megatron, incl_embeds=False)  # exact from resid_pre0, as the message says
    torch.testing.assert_close(parts.sum(0) + c["blocks.0.hook_resid_pre"], c["blocks.1.hook_resid_post"],
                               atol=1e-5, rtol=0)
    assert check_sites(megatron, ids).ok


def test_head_transform_before_the_lm_head_makes_W_U_raise(megatron):
    with pytest.raises(ValueError, match="does not read ln_final.hook_out directly"):
        megatron.W_U


def test_ctrl_in_place_embedding_scale_is_in_hook_embed_and_W_E():
    m = _trace("ctrl", n_embd=32, n_layer=2, n_head=4, n_positions=64, dff=64)
    ids = tokens(2, 6)
    _, c = m.run_with_cache(ids)
    ref = m.hf_model.transformer.w(ids) * 32 ** 0.5
    torch.testing.assert_close(c["hook_embed"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.W_E[ids], ref, atol=1e-5, rtol=0)
    assert check_sites(m, ids).ok
