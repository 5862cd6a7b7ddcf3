"""Every site class holds the right tensor: references from HF hooks, hidden_states, eager attentions."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import fxlens
from fxlens.check import check_sites
from tests.conftest import tokens, traced


def _tiny(model_type: str, seed: int = 0, auto=transformers.AutoModelForCausalLM, **kw) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, **kw)
    torch.manual_seed(seed)
    model = auto.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


_LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)


def _assert_green(m: fxlens.HookedModel, ids: torch.Tensor | None = None) -> None:
    res = check_sites(m, ids)
    assert res.ok, res.summary() + f" skipped={res.skipped}"


def test_every_core_family_has_correct_site_values(family):
    _assert_green(traced(family), tokens(2, 6))


def test_granite_embedding_and_residual_multipliers():
    """Granite scales the embedding (x3 here) and each branch (x0.5) outside their modules."""
    hf = _tiny("granite", embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, **_LLAMA)
    m = fxlens.trace(hf, graph_cache=False)
    ids = tokens(2, 6)
    _, cache = m.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    ref = hf.model.embed_tokens(ids) * 3.0
    assert (cache["hook_embed"] - ref).abs().max().item() <= 1e-6
    assert (cache["hook_embed"] - cache["blocks.0.hook_resid_pre"]).abs().max().item() == 0
    res = check_sites(m, ids)
    for cls in ("resid", "embed", "attn_out", "mlp_out", "decompose", "pattern", "qkv", "norm"):
        assert res.classes[cls].ok, (cls, res.summary())
    assert m.sites["blocks.0.hook_attn_out"].extra["scale"] == 0.5


def test_granite_weights_include_its_multipliers():
    """W_E, W_O, W_out and W_U are what Granite's sites imply: embedding_multiplier, residual_multiplier and
    logits_scaling are applied outside the modules and must be in the weights (heads summed to 0.14 off)."""
    hf = _tiny("granite", embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0, **_LLAMA)
    m = fxlens.trace(hf, graph_cache=False)
    ids = tokens(2, 6)
    logits, c = m.run_with_cache(ids)
    res = check_sites(m, ids)
    assert res.ok and res.classes["heads"].ok and res.classes["weights"].ok, res.summary()
    torch.testing.assert_close(m.W_E[ids], c["hook_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.W_E, hf.model.embed_tokens.weight * 3.0)
    torch.testing.assert_close(c["ln_final.hook_out"] @ m.W_U + m.b_U, logits, atol=1e-5, rtol=0)
    for L in range(2):
        z = torch.einsum("bshd,hdm->bsm", c[f"blocks.{L}.attn.hook_z"], m.W_O[L]) + m.b_O[L]
        torch.testing.assert_close(z, c[f"blocks.{L}.hook_attn_out"], atol=1e-5, rtol=0)
        out = c[f"blocks.{L}.mlp.hook_post"] @ m.W_out[L] + m.b_out[L]
        torch.testing.assert_close(out, c[f"blocks.{L}.hook_mlp_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(m.W_O[0], 0.5 * hf.model.layers[0].self_attn.o_proj.weight.T.unflatten(0, (4, 8)))


def test_gemma_embedding_scale_is_in_W_E():
    """Gemma scales its embedding module's output by sqrt(d_model): W_E includes it, as TransformerLens."""
    m = traced("gemma")
    ids = tokens(2, 6)
    _, c = m.run_with_cache(ids, names_filter=["hook_embed"])
    torch.testing.assert_close(m.W_E[ids], c["hook_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(m.W_E, m.hf_model.model.embed_tokens.weight * 32 ** 0.5)


def test_head_counts_come_from_the_graph_not_stray_config_attributes():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                  num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    m = fxlens.trace(transformers.GPT2LMHeadModel(cfg).eval(), graph_cache=False)
    assert (m.cfg.n_heads, m.cfg.n_kv_heads, m.cfg.d_head) == (4, 4, 8)
    _assert_green(m)


def test_checker_catches_a_wrong_site():
    """A site moved to the wrong tensor fails its class (the checker can fail)."""
    m = fxlens.trace(_tiny("llama", **_LLAMA), graph_cache=False)
    sites = m.sites
    good = sites["blocks.1.hook_attn_out"].node
    sites["blocks.1.hook_attn_out"].node = sites["blocks.1.hook_mlp_out"].node
    try:
        res = check_sites(m, tokens(2, 6))
    finally:
        sites["blocks.1.hook_attn_out"].node = good
    assert "attn_out" in res.failed and res.failed["attn_out"].max_err > 1e-3


_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
_BART = dict(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
             decoder_ffn_dim=64, encoder_ffn_dim=64, max_position_embeddings=64)
_MPT = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64)

#: one family per capability, none with a rule: (model_type, auto class, config kwargs)
DISCOVERED = {
    "cohere": ("cohere", transformers.AutoModelForCausalLM, _LLAMA),  # parallel block, LayerNorm
    "electra": ("electra", transformers.AutoModel, dict(_ENC, embedding_size=32)),  # post-norm encoder
    "bart": ("bart", transformers.AutoModelForCausalLM, _BART),  # post-norm decoder
    "olmo2": ("olmo2", transformers.AutoModelForCausalLM, _LLAMA),  # x + norm(sublayer(x))
    "mpt": ("mpt", transformers.AutoModelForCausalLM, _MPT),  # ALiBi; seq constraint -> Dim.AUTO
    "granitemoe": ("granitemoe", transformers.AutoModelForCausalLM,  # forward takes no use_cache; MoE
                   dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=3.0)),
    "glm4_moe": ("glm4_moe", transformers.AutoModelForCausalLM,  # dense block 0, MoE block 1 (per-layer MoE)
                 dict(_LLAMA, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1)),
    "openai-gpt": ("openai-gpt", transformers.AutoModelForCausalLM,  # post-norm, shared activation module
                   dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
}


@pytest.mark.parametrize("family_id", sorted(DISCOVERED))
def test_discovered_family_site_values(family_id):
    model_type, auto, kw = DISCOVERED[family_id]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fxlens.trace(_tiny(model_type, auto=auto, **kw), graph_cache=False)
    assert m.family.name == model_type and all(s.found_by == "discovery" for s in m.sites.values())
    res = check_sites(m, tokens(2, 6))
    assert res.ok, res.summary() + f" skipped={res.skipped}"
    if family_id == "glm4_moe":
        assert "blocks.0.mlp.hook_pre" in m.sites and "blocks.1.mlp.hook_router_logits" in m.sites
        assert "blocks.1.mlp.hook_pre" not in m.sites


def test_mpt_capture_mode_is_reported():
    with pytest.warns(UserWarning, match="Dim.AUTO"):
        m = fxlens.trace(_tiny("mpt", **_MPT), graph_cache=False)
    assert m.capture_mode == "auto"


def test_state_space_model_is_refused_with_a_reason():
    hf = _tiny("mamba", hidden_size=32, num_hidden_layers=2, state_size=4, expand=2)
    with pytest.raises(ValueError, match="unsupported: state-space layers have no attention sites"):
        fxlens.trace(hf, graph_cache=False)  # refused by fxlens.support before capture


def test_a_nan_site_value_fails_its_class():
    """NaN where the reference has a number is a failure (max() of a NaN error used to read as 0)."""
    from fxlens.check import SiteCheck

    res = SiteCheck()
    res._record("qkv", "blocks.0.attn.hook_q", torch.full((2, 3), float("nan")), torch.ones(2, 3))
    assert not res.classes["qkv"].ok and "qkv" in res.failed
