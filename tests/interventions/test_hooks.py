"""Hook API: properties (hypothesis), patching, batching, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxlens import SiteError
from tests.conftest import FAMILIES, tokens, traced

_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(family=st.sampled_from(FAMILIES), data=st.data())
def test_identity_hook_on_any_site_leaves_output_unchanged(family, data):
    m = traced(family)
    site = data.draw(st.sampled_from(m.all_hook_names))
    ids = tokens(2, 6)
    seen = []
    out = m.run_with_hooks(ids, fwd_hooks=[(site, lambda x, hook: seen.append(hook.name) or x.clone())])
    assert seen == [site]
    assert (out - m(ids)).abs().max().item() <= 1e-5


@_settings
@given(family=st.sampled_from(FAMILIES), layer=st.integers(0, 1))
def test_patching_resid_pre_with_clean_value_restores_clean_output(family, layer):
    m = traced(family)
    clean, corrupt = tokens(1, 6, seed=2), tokens(1, 6, seed=3)
    clean_out, cache = m.run_with_cache(clean, names_filter=f"blocks.{layer}.hook_resid_pre")
    name = f"blocks.{layer}.hook_resid_pre"
    patched = m.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook: cache[hook.name])])
    assert (patched - clean_out).abs().max().item() <= 1e-5
    assert (m(corrupt) - clean_out).abs().max().item() > 1e-3  # the patch did something


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_three_equals_three_single_runs(family):
    m = traced(family)
    ids = tokens(3, 7)
    out, cache = m.run_with_cache(ids, names_filter=lambda n: "pattern" in n or "resid_post" in n)
    for i in range(3):
        one, c1 = m.run_with_cache(ids[i : i + 1], names_filter=lambda n: "pattern" in n or "resid_post" in n)
        assert (out[i : i + 1] - one).abs().max().item() <= 1e-5
        for k in c1:
            assert (cache[k][i : i + 1] - c1[k]).abs().max().item() <= 1e-5


def test_hook_sees_layer_and_can_ablate_a_head():
    m = traced("llama")
    ids = tokens(1, 5)
    layers = []

    def ablate(z, hook):
        layers.append(hook.layer())
        z = z.clone()
        z[:, :, 1] = 0
        return z

    out = m.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("hook_z"), ablate)])
    assert layers == [0, 1]
    assert (out - m(ids)).abs().max().item() > 1e-4
    _, cache = m.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]):
        _, hooked = m.run_with_cache(ids, names_filter="blocks.0.attn.hook_z")
    assert hooked["z", 0][:, :, 1].abs().max() == 0 and cache["z", 0][:, :, 1].abs().max() > 0


def test_hooks_context_and_reset():
    m = traced("gpt2")
    ids = tokens(1, 4)
    calls = []
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: calls.append(1))]):
        m(ids)
    m(ids)
    assert calls == [1]
    m.add_hook("blocks.0.hook_mlp_out", lambda x, hook: calls.append(2))
    m(ids)
    m(ids)
    m.reset_hooks()
    m(ids)
    assert calls == [1, 2, 2]


def test_scale_hook_changes_the_norm_output():
    m = traced("gpt2")
    ids = tokens(1, 4)
    _, base = m.run_with_cache(ids, names_filter="blocks.0.ln1.hook_out")
    with m.hooks(fwd_hooks=[("blocks.0.ln1.hook_scale", lambda s, hook: s * 2)]):
        _, doubled = m.run_with_cache(ids, names_filter="blocks.0.ln1.hook_out")
    ln = m.hf_model.transformer.h[0].ln_1
    expected = (base["blocks.0.ln1.hook_out"] - ln.bias) / 2 + ln.bias
    assert torch.allclose(doubled["blocks.0.ln1.hook_out"], expected, atol=1e-5)


def test_mlp_in_hook_changes_only_the_mlp_input():
    m = traced("llama")
    ids = tokens(1, 5)
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: torch.zeros_like(x))]):
        _, c = m.run_with_cache(ids, names_filter=["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out",
                                                   "blocks.0.hook_resid_post"])
    _, clean = m.run_with_cache(ids, names_filter="blocks.0.hook_resid_mid")
    assert torch.equal(c["resid_mid", 0], clean["resid_mid", 0])
    mlp = m.hf_model.model.layers[0].mlp
    expected = mlp(m.hf_model.model.layers[0].post_attention_layernorm(torch.zeros_like(c["resid_mid", 0])))
    assert torch.allclose(c["mlp_out", 0], expected, atol=1e-6)
    assert torch.allclose(c["resid_post", 0], c["resid_mid", 0] + c["mlp_out", 0], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "phi3"])
def test_split_inputs_reproduce_q_and_can_be_patched_per_head(family):
    m = traced(family)
    ids = tokens(2, 5)
    names = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
    out, split = m.run_with_cache(ids, names_filter=names)
    _, plain = m.run_with_cache(ids, names_filter=names[2:])
    assert (out - m(ids)).abs().max().item() <= 1e-5
    assert torch.allclose(split["q", 1], plain["q", 1], atol=1e-5)
    assert split["blocks.1.hook_k_input"].shape == (2, 5, m.cfg.n_kv_heads, m.cfg.d_model)

    def zero_head0(x, hook):
        x = x.clone()
        x[:, :, 0] = 0
        return x

    with m.hooks(fwd_hooks=[("blocks.1.hook_q_input", zero_head0)]):
        _, hooked = m.run_with_cache(ids, names_filter=["blocks.1.attn.hook_q"])
    assert torch.allclose(hooked["q", 1][:, :, 1:], plain["q", 1][:, :, 1:], atol=1e-5)
    assert not torch.allclose(hooked["q", 1][:, :, 0], plain["q", 1][:, :, 0], atol=1e-3)


# -- errors -------------------------------------------------------------------
def test_unknown_site_lists_close_names():
    m = traced("llama")
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pre"):
        m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, hook: x)])
    with pytest.raises(KeyError, match="closest"):
        m.run_with_cache(tokens(1, 3), names_filter=["blocks.0.attn.hook_patern"])


def test_hook_with_wrong_shape_or_dtype_names_the_site():
    m = traced("llama")
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*\(1, 3, 32\)"):
        m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x[:, :2])])
    with pytest.raises(ValueError, match="dtype"):
        m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x.double())])


def test_context_and_empty_input_errors():
    m = traced("gpt2")
    with pytest.raises(ValueError, match="context is 64"):
        m(tokens(1, 65))
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros(1, 0, dtype=torch.long))


def test_family_whose_sites_cannot_be_placed_names_them():
    from dataclasses import replace

    from fxlens.tracer.capture import capture
    from fxlens.tracer.families import rule_for
    from fxlens.tracer.locate import Shape, locate

    m = traced("llama")
    broken = replace(rule_for("llama"), attn_out="self_attn.out_proj")
    with pytest.raises(SiteError, match=r"blocks\.0\.hook_attn_out.*out_proj"):
        locate(capture(m.hf_model).gm, broken, Shape(2, 32, 4, 2, 8))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_fires_its_hook_exactly_once(family):
    m = traced(family)
    ids = tokens(2, 5)
    split = [n for n in m.all_hook_names if n not in m.hook_names]
    for names in (m.hook_names, split):
        seen: list[str] = []
        out = m.run_with_hooks(ids, fwd_hooks=[(n, lambda x, hook: seen.append(hook.name)) for n in names])
        assert sorted(seen) == sorted(names)
        assert (out - m(ids)).abs().max().item() <= 1e-5


def test_ln1_hooks_conflict_with_full_split_inputs():
    m = traced("llama")
    with pytest.raises(ValueError, match="ln1 runs on those copies"):
        m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_attn_in", lambda x, hook: x),
                                                  ("blocks.0.ln1.hook_normalized", lambda x, hook: x)])
    # only q split: ln1 still computes k and v, so its hook runs
    seen = []
    m.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.hook_q_input", lambda x, hook: seen.append(1)),
                                              ("blocks.0.ln1.hook_normalized", lambda x, hook: seen.append(2))])
    assert sorted(seen) == [1, 2]
    # caching ln1 with full split inputs is fine: the shared ln1 output is still computed
    _, cache = m.run_with_cache(tokens(1, 3), names_filter=["blocks.0.hook_attn_in", "blocks.0.ln1.hook_normalized"])
    _, plain = m.run_with_cache(tokens(1, 3), names_filter=["blocks.0.ln1.hook_normalized"])
    assert torch.equal(cache["blocks.0.ln1.hook_normalized"], plain["blocks.0.ln1.hook_normalized"])
