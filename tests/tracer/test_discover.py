"""Discovery: families with no rule get correct sites from graph structure alone."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict

import pytest
import torch
import transformers

import fxlens
from fxlens.cli import main as cli_main
from fxlens.tracer.discover import DiscoveryError, discover
from fxlens.tracer.families import RULES
from tests.conftest import FAMILIES, tokens, traced

DECODERS = [f for f in FAMILIES if not traced(f).family.post_norm]


@pytest.mark.parametrize("family", DECODERS)
def test_discovery_reproduces_every_hand_written_rule(family):
    m = traced(family)
    found = discover(m.hf_model, m.base_graph, m.cfg.n_layers)
    rule = asdict(m.family)
    for key in ("name", "model_types"):
        rule.pop(key)
    assert {k: getattr(found, k) for k in rule} == rule


def _tiny(model_type: str, **kw) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, max_position_embeddings=64, **kw)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# Families the core issue does not list and no rule covers: a Llama-like with LayerNorm and
# partial rotary (StableLM), a non-gated MLP with biases (Starcoder2), parallel blocks with one
# shared norm (Phi-2).
NO_RULE = {
    "stablelm": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64),
    "starcoder2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
}


@pytest.mark.parametrize("model_type", sorted(NO_RULE))
def test_family_without_rule_is_traced_with_correct_sites(model_type):
    assert model_type not in RULES
    hf = _tiny(model_type, **NO_RULE[model_type])
    m = fxlens.trace(hf, graph_cache=False)
    assert {s.found_by for s in m.sites.values()} == {"discovery"}
    ids = tokens(2, 7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    out, cache = m.run_with_cache(ids)
    assert (m(ids) - ref.logits).abs().max().item() <= 1e-5
    assert (out - ref.logits).abs().max().item() <= 1e-5
    assert (cache["resid_pre", 0] - ref.hidden_states[0]).abs().max().item() <= 1e-5
    assert (cache["resid_post", 0] - ref.hidden_states[1]).abs().max().item() <= 1e-5
    assert (cache["ln_final.hook_out"] - ref.hidden_states[-1]).abs().max().item() <= 1e-5
    hf.set_attn_implementation("eager")
    with torch.no_grad():
        attn = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
    for L in range(2):
        assert (cache["pattern", L] - attn[L]).abs().max().item() <= 1e-5
    assert cache["q", 0].shape == (2, 7, m.cfg.n_heads, m.cfg.d_head)
    assert cache["k", 0].shape == (2, 7, m.cfg.n_kv_heads, m.cfg.d_head)
    # resid_post = resid_pre + attn_out (+ mlp_out): the decomposition holds
    total = cache["resid_pre", 0] + cache["attn_out", 0] + cache["mlp_out", 0]
    assert (total - cache["resid_post", 0]).abs().max().item() <= 1e-5
    if m.cfg.parallel_attn_mlp:
        assert "blocks.0.hook_resid_mid" not in m.sites and "blocks.0.ln2.hook_normalized" not in m.sites


def test_discovery_reads_post_norm_blocks_as_the_bert_rule_does():
    m = traced("bert")  # post-norm encoder: norm(x + sublayer(x)), no norm feeds attention
    found = discover(m.hf_model, m.base_graph, m.cfg.n_layers)
    for field in ("embed", "pos_embed", "layers", "ln1", "ln2", "attn", "attn_out", "mlp_act", "mlp_out",
                  "post_norm", "gated", "ln_final"):
        assert getattr(found, field) == getattr(m.family, field), field


def test_discovery_refuses_what_it_cannot_read():
    m = traced("llama")
    base = m.base_graph  # read before the change below (which would make the model re-capture)
    layers = m.hf_model.model.layers
    m.hf_model.model.layers = torch.nn.ModuleList(list(layers) + [layers[0]])  # no list of n_layers blocks
    try:
        with pytest.raises(DiscoveryError, match="ModuleList of 2 blocks"):
            discover(m.hf_model, base, m.cfg.n_layers)
    finally:
        m.hf_model.model.layers = layers


def test_sites_cli_shows_discovered_table(tmp_path):
    _tiny("stablelm", **NO_RULE["stablelm"]).save_pretrained(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.warns(UserWarning, match="no tokenizer"):
        assert cli_main(["sites", str(tmp_path)]) == 0
    text = out.getvalue()
    assert "blocks.0.attn.hook_rot_q" in text and "discovery" in text and "model.layers.0.self_attn" in text


def test_mixture_of_experts_block_sites():
    hf = _tiny("mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    m = fxlens.trace(hf, graph_cache=False)
    assert m.family.moe and "blocks.0.mlp.hook_pre" not in m.sites
    ids = tokens(2, 5)
    out, cache = m.run_with_cache(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
    assert (out - ref.logits).abs().max().item() <= 1e-5
    for L in range(2):
        router = cache[f"blocks.{L}.mlp.hook_router_logits"]
        assert router.shape == (2, 5, 4)
        assert (router.flatten(0, 1) - ref.router_logits[L]).abs().max().item() <= 1e-5
        assert (cache["resid_mid", L] + cache["mlp_out", L] - cache["resid_post", L]).abs().max().item() <= 1e-5
    # steering the router changes the output: the hook is honoured inside the MoE block
    bias = torch.tensor([10.0, 0, 0, -10.0])
    steered = m.run_with_hooks(ids, fwd_hooks=[("blocks.0.mlp.hook_router_logits", lambda x, hook: x + bias)])
    assert (steered - out).abs().max().item() > 1e-4
