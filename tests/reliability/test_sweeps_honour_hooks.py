"""Every patching schedule honours the hooks active on the model and agrees with the loop."""

from __future__ import annotations

import logging

import pytest
import torch

from fxlens.interventions import patching as P
from fxlens.interventions.patches import AddPatch, MeanPatch, ZeroPatch
from tests.conftest import tokens, traced


def _metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


def _sweep(m, corrupt, cache, sites, schedule, **kw):
    return P.patch_sweep(m, corrupt, cache, _metric, sites, schedule=schedule, progress=False, **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("template", ["blocks.{L}.hook_resid_pre", "blocks.{L}.hook_attn_out",
                                      "blocks.{L}.hook_resid_post"])
def test_schedules_agree_with_the_loop_under_active_patches(family, template):
    m = traced(family)
    clean, corrupt = tokens(2, 6, seed=2), tokens(2, 6, seed=3)
    _, cache = m.run_with_cache(clean)
    sites = [template.format(L=L) for L in range(m.cfg.n_layers)]
    v = torch.randn(m.cfg.d_model)
    plain = _sweep(m, corrupt, cache, sites, "loop")
    with m.patch({"blocks.0.hook_resid_post": AddPatch(vector=v), "blocks.1.hook_mlp_out": MeanPatch()}):
        m.add_hook("blocks.1.hook_resid_pre", lambda x, hook: x * 1.5)
        try:
            ref = _sweep(m, corrupt, cache, sites, "loop")
            for schedule in ("batched", "wavefront", "auto"):
                got = _sweep(m, corrupt, cache, sites, schedule)
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"{schedule}")
        finally:
            m.reset_hooks()
    assert (ref - plain).abs().max() > 1e-3  # the active hooks changed the answer


def test_head_sweep_agrees_under_an_active_head_ablation():
    m = traced("llama")
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)
    _, cache = m.run_with_cache(clean)
    with m.patch({"blocks.0.attn.hook_z": ZeroPatch(head=1)}):
        ref = P.get_act_patch_attn_head_out_by_pos(m, corrupt, cache, _metric, schedule="loop", progress=False)
        for schedule in ("batched", "wavefront"):
            got = P.get_act_patch_attn_head_out_by_pos(m, corrupt, cache, _metric, schedule=schedule, progress=False)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_auto_logs_the_schedule_it_ran(caplog):
    m = traced("llama")
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)
    _, cache = m.run_with_cache(clean)
    with caplog.at_level(logging.INFO, logger="fxlens.patching"):
        _sweep(m, corrupt, cache, ["blocks.0.hook_resid_pre"], "auto")
        _sweep(m, corrupt, cache, ["hook_embed"], "auto")
    text = caplog.text
    assert "schedule=wavefront" in text and "schedule=batched" in text
    assert "runs 'batched' because the wavefront cannot" in text and "outside the blocks" in text


def test_wavefront_refuses_sites_outside_blocks():
    m = traced("llama")
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)
    _, cache = m.run_with_cache(clean)
    with pytest.raises(ValueError, match="outside the blocks"):
        _sweep(m, corrupt, cache, ["hook_embed"], "wavefront")


@pytest.mark.parametrize(("kw", "exc", "words"), [
    (dict(max_memory=0), ValueError, "must be positive"),
    (dict(max_memory=-5), ValueError, "must be positive"),
    (dict(max_memory=1.5), ValueError, "number of bytes"),
    (dict(max_memory="lots"), ValueError, "cannot read a memory size"),
    (dict(logits_at=9), ValueError, "logits_at must be positions"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(schedule="fast"), ValueError, "schedule must be"),
])
def test_bad_sweep_arguments_are_named(kw, exc, words):
    m = traced("llama")
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)
    _, cache = m.run_with_cache(clean)
    with pytest.raises(exc, match=words):
        _sweep(m, corrupt, cache, ["blocks.0.hook_resid_pre"], kw.pop("schedule", "auto"), **kw)


def test_clean_and_corrupted_of_different_shapes_are_refused():
    m = traced("llama")
    _, cache = m.run_with_cache(tokens(1, 6, seed=2))
    with pytest.raises(ValueError, match="same batch size and number of tokens"):
        _sweep(m, tokens(1, 5, seed=3), cache, ["blocks.0.hook_resid_pre"], "auto")
    _, cache2 = m.run_with_cache(tokens(2, 5, seed=2))
    with pytest.raises(ValueError, match="same batch size"):
        _sweep(m, tokens(1, 5, seed=3), cache2, ["blocks.0.hook_resid_pre"], "auto")


def test_a_metric_returning_none_is_named():
    m = traced("llama")
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)
    _, cache = m.run_with_cache(clean)
    with pytest.raises(TypeError, match="patching_metric must return a number"):
        P.patch_sweep(m, corrupt, cache, lambda logits: None, ["blocks.0.hook_resid_pre"], progress=False)


def test_clean_tokens_of_a_padded_sweep_need_their_mask():
    m = traced("llama")
    clean, corrupt = tokens(2, 6, seed=2), tokens(2, 6, seed=3)
    mask = torch.ones_like(corrupt)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="clean_attention_mask"):
        P.patch_sweep(m, corrupt, clean, _metric, ["blocks.0.hook_resid_pre"], attention_mask=mask, progress=False)
    got = P.patch_sweep(m, corrupt, clean, _metric, ["blocks.1.hook_resid_pre"], attention_mask=mask,
                        clean_attention_mask=mask, progress=False)
    _, cache = m.run_with_cache(clean, attention_mask=mask)
    ref = P.patch_sweep(m, corrupt, cache, _metric, ["blocks.1.hook_resid_pre"], attention_mask=mask,
                        schedule="loop", progress=False)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
