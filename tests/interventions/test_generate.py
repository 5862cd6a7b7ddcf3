"""Generation with hooks: greedy equals HF generate; module-boundary hooks see the graph's site values."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions.patches import AddPatch, ZeroPatch
from tests.conftest import tokens, traced

GEN_FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma2", "opt"]
SITES = ["blocks.{L}.hook_resid_pre", "blocks.{L}.hook_resid_post", "blocks.{L}.hook_attn_out",
         "blocks.{L}.hook_mlp_out", "blocks.{L}.attn.hook_z", "blocks.{L}.mlp.hook_pre", "blocks.{L}.mlp.hook_post",
         "blocks.{L}.ln1.hook_out", "ln_final.hook_out"]
@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_greedy_without_hooks_equals_hf_generate(family):
    m = traced(family)
    ids = tokens(2, 5)
    ours = m.generate(ids, max_new_tokens=6, do_sample=False)
    ref = m.hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_generation_hooks_see_the_graph_site_values(family):
    m = traced(family)
    ids = tokens(2, 5)
    names = [s.format(L=1) for s in SITES if s.format(L=1) in m.sites and m.sites[s.format(L=1)].layout != "flat"]
    if m.family.ln2 and m.sites["blocks.0.ln2.hook_out"].layout != "flat":
        names.append("blocks.0.ln2.hook_out")
    _, cache = m.run_with_cache(ids, names_filter=names)
    seen = {}

    def record(x, hook):
        seen.setdefault(hook.name, x.clone())

    m.generate(ids, max_new_tokens=2, fwd_hooks=[(n, record) for n in names])
    assert set(seen) == set(names)
    for n in names:  # the first call is the full prompt
        torch.testing.assert_close(seen[n], cache[n], atol=1e-5, rtol=1e-5, msg=n)


def test_generation_refuses_hook_normalized():
    """TL's hook_normalized (before the norm's weight) is at no module boundary: the boundary check refuses it."""
    m = traced("llama")
    with pytest.raises(ValueError, match="hook_normalized"):
        m.generate(tokens(1, 4), max_new_tokens=1, fwd_hooks=[("blocks.0.ln1.hook_normalized", lambda x, hook: x)])


def _greedy_by_graph(m, ids, hooks, n):
    for _ in range(n):
        logits = m.run_with_hooks(ids, fwd_hooks=hooks)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooked_generation_equals_greedy_decoding_through_the_graph(family):
    m = traced(family)
    ids = tokens(1, 5)
    v = torch.randn(m.cfg.d_model) * 3
    hooks = [("blocks.0.hook_resid_post", AddPatch(vector=v)), ("blocks.1.attn.hook_z", ZeroPatch(head=1))]
    ours = m.generate(ids, max_new_tokens=5, fwd_hooks=hooks, eos_token_id=None, do_sample=False)
    ref = _greedy_by_graph(m, ids, hooks, 5)
    assert torch.equal(ours, ref)
    unhooked = m.generate(ids, max_new_tokens=5, eos_token_id=None, do_sample=False)
    assert not torch.equal(ours, unhooked)  # the hooks mattered


def test_model_patch_context_applies_during_generation_and_positions_are_tracked():
    m = traced("llama")
    ids = tokens(1, 4)
    offsets = []
    with m.patch({"blocks.0.hook_mlp_out": ZeroPatch()}):
        inside = m.generate(ids, max_new_tokens=3, eos_token_id=None, do_sample=False,
                            fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: offsets.append(
                                (hook.pos_offset, x.shape[1])))])
    ref = _greedy_by_graph(m, ids, [("blocks.0.hook_mlp_out", ZeroPatch())], 3)
    assert torch.equal(inside, ref)
    assert offsets == [(0, 4), (4, 1), (5, 1)]


def test_graph_only_sites_raise():
    opt = traced("opt")
    flat = "blocks.0.hook_mlp_out"
    assert opt.sites[flat].layout == "flat"
    with pytest.raises(ValueError, match="flattened"):
        opt.generate(tokens(1, 4), max_new_tokens=2, fwd_hooks=[(flat, lambda x, hook: x)])
    m = traced("llama")
    with pytest.raises(ValueError, match="only inside the captured graph"):
        m.generate(tokens(1, 4), max_new_tokens=2, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: x)])
    gemma, seen = traced("gemma"), []  # its embedding module scales inside: the boundary check passes
    gemma.generate(tokens(1, 4), max_new_tokens=2, do_sample=False,
                   fwd_hooks=[("hook_embed", lambda x, hook: seen.append(x.clone()))])
    _, cache = gemma.run_with_cache(tokens(1, 4), names_filter="hook_embed")
    torch.testing.assert_close(seen[0], cache["hook_embed"], atol=1e-6, rtol=1e-6)


def test_sampling_settings_travel_in_the_generation_config(monkeypatch):
    """HF deprecates generation settings passed beside ``generation_config``: they go inside it, and
    sampled text equals HF's own ``generate`` with the same seed and settings."""
    m = traced("llama")
    ids = tokens(1, 5)
    seen = {}
    hf_generate = m.hf_model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return hf_generate(*args, **kwargs)

    monkeypatch.setattr(m.hf_model, "generate", spy)
    torch.manual_seed(0)
    ours = m.generate(ids, max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9)
    assert set(seen) == {"input_ids", "attention_mask", "generation_config"}
    gen = seen["generation_config"]
    assert (gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (6, True, 0.7, 5, 0.9)
    torch.manual_seed(0)
    ref = hf_generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                      temperature=0.7, top_k=5, top_p=0.9, pad_token_id=0)
    assert torch.equal(ours, ref)
