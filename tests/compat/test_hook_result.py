"""``attn.hook_result`` can be hooked (TL's ``use_attn_result``) and equals HF with the head's o_proj
input edited; cached after its hooks; refused where it cannot be exact."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens
from fxlens.interventions import patching
from tests.conftest import VOCAB, tiny_hf, tokens, traced


def _hf_without_head(hf, o_proj, head: int, d_head: int, ids):
    def pre(mod, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)
    h = o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        h.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ablating_a_head_result_equals_hf_without_that_head(family):
    hf = tiny_hf(family)
    m = fxlens.trace(hf)
    ids = tokens(2, 6)
    seen = []

    def ablate(r, hook):
        seen.append((hook.name, tuple(r.shape)))
        r[:, :, 2] = 0.0  # in place, as TL code often does

    out = m.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_result", ablate)])
    o_proj = hf.model.layers[1].self_attn.o_proj if family == "llama" else hf.transformer.h[1].attn.c_proj
    ref = _hf_without_head(hf, o_proj, 2, m.cfg.d_head, ids)
    assert seen == [("blocks.1.attn.hook_result", (2, 6, m.cfg.n_heads, m.cfg.d_model))]
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - m(ids)).abs().max().item() > 1e-2  # the head mattered
    identity = m.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_result", lambda r, hook: r)])
    assert (identity - m(ids)).abs().max().item() < 1e-5


def test_hooked_result_is_cached_after_its_hooks_and_listed_only_with_use_attn_result():
    m = fxlens.trace(tiny_hf("llama"))
    ids = tokens(1, 5)
    assert not any(n.endswith("hook_result") for n in m.hook_names)
    with pytest.raises(KeyError, match="needs model.set_use_attn_result"):
        m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_result"])
    m.set_use_attn_result(True)
    _, plain = m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_result"])

    def double(r, hook):
        return r * 2

    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_result", double)]):
        _, hooked = m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_result"])
    torch.testing.assert_close(hooked["blocks.0.attn.hook_result"], 2 * plain["blocks.0.attn.hook_result"])
    # a predicate matches hook_result when use_attn_result is on, as in TransformerLens
    calls = []
    m.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("attn.hook_result"),
                                      lambda r, hook: calls.append(hook.name))])
    assert calls == [f"blocks.{L}.attn.hook_result" for L in range(m.cfg.n_layers)]


def test_entry_points_that_cannot_run_it_raise():
    m = fxlens.trace(tiny_hf("llama"))
    clean, corrupt = tokens(1, 5, seed=1), tokens(1, 5, seed=2)
    _, cache = m.run_with_cache(clean)
    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_result", lambda r, hook: r * 0)]):
        with pytest.raises(ValueError, match="only schedule='loop' runs them"):
            patching.get_act_patch_resid_pre(m, corrupt, cache, lambda logits: logits[0, -1, 0])
        with pytest.raises(ValueError, match="cannot be hooked during generation"):
            m.generate(clean, max_new_tokens=2, do_sample=False, verbose=False)
    with pytest.raises(ValueError, match="backward hooks at blocks.0.attn.hook_result"):
        m.run_with_hooks(clean, bwd_hooks=[("blocks.0.attn.hook_result", lambda g, hook: None)])


def test_refused_where_head_results_do_not_sum_to_attn_out():
    m = traced("gemma2")  # attention post-norm: the heads' results are normed together
    with pytest.raises(KeyError, match="not available in this gemma2 model"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[("blocks.0.attn.hook_result", lambda r, hook: r)])


def test_a_model_scaling_attn_out_after_the_projection_is_exact_or_refused():
    """Granite multiplies the attention output by ``residual_multiplier`` after ``o_proj``: hooking
    hook_result there must either equal HF with the head removed or raise, never be off."""
    cfg = transformers.GraniteConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, residual_multiplier=0.5,
                                     embedding_multiplier=3.0, attention_multiplier=0.2, logits_scaling=2.0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    m = fxlens.trace(hf)
    ids = tokens(1, 5)

    def ablate(r, hook):
        r[:, :, 1] = 0.0

    try:
        out = m.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_result", ablate)])
    except ValueError as e:
        assert "differ from hook_attn_out" in str(e)
        return
    ref = _hf_without_head(hf, hf.model.layers[0].self_attn.o_proj, 1, m.cfg.d_head, ids)
    assert (out - ref).abs().max().item() < 1e-5


def test_run_names_a_result_site_with_the_way_to_get_it():
    m = traced("llama")
    with pytest.raises(KeyError, match="computed from hook_z, not a graph site.*set_use_attn_result"):
        m.run(tokens(1, 4), names=["blocks.0.attn.hook_result"])
