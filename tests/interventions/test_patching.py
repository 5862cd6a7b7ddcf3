"""Patching sweeps: batched and wavefront schedules equal the one-forward-per-cell loop."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions import patching as P
from fxlens.interventions import sweep
from fxlens.interventions.patches import MeanPatch, ZeroPatch
from tests.conftest import tokens, traced

SWEEPS = [P.get_act_patch_resid_pre, P.get_act_patch_resid_post, P.get_act_patch_attn_out,
          P.get_act_patch_mlp_out, P.get_act_patch_attn_head_out_all_pos, P.get_act_patch_attn_head_out_by_pos]


def _setup(family):
    m = traced(family)
    clean, corrupted = tokens(2, 6, seed=2), tokens(2, 6, seed=3)
    corrupted[:, :2] = clean[:, :2]  # a shared prefix: those cells are skipped (their value is exact)
    _, cache = m.run_with_cache(clean)
    return m, corrupted, cache


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


FAST = [("llama", s) for s in SWEEPS] + [("gpt2", P.get_act_patch_resid_pre),
                                          ("gpt_neox", P.get_act_patch_attn_head_out_all_pos),
                                          ("opt", P.get_act_patch_attn_out)]
FULL = [(f, s) for f in ("llama", "gpt2", "gpt_neox", "opt", "gemma2", "phi3") for s in SWEEPS]
CASES = FAST + [pytest.param(f, s, marks=pytest.mark.slow) for f, s in FULL if (f, s) not in FAST]


@pytest.mark.parametrize(("family", "sweep"), CASES, ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_batched_schedules_match_the_per_cell_loop(family, sweep):
    m, corrupted, cache = _setup(family)
    ref = sweep(m, corrupted, cache, metric, schedule="loop", progress=False)
    assert ref.isfinite().all() and ref.std() > 0
    for schedule, kw in (("batched", {}), ("wavefront", {"logits_at": -1}), ("auto", {"batch_size": 6})):
        got = sweep(m, corrupted, cache, metric, schedule=schedule, progress=False, **kw)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4, schedule


def test_shapes_follow_transformerlens():
    m, corrupted, cache = _setup("llama")
    c = m.cfg
    assert P.get_act_patch_resid_pre(m, corrupted, cache, metric, progress=False).shape == (c.n_layers, 6)
    assert P.get_act_patch_attn_head_out_all_pos(m, corrupted, cache, metric, progress=False).shape == (
        c.n_layers, c.n_heads)
    assert P.get_act_patch_attn_head_out_by_pos(m, corrupted, cache, metric, progress=False).shape == (
        c.n_layers, 6, c.n_heads)
    assert P.get_act_patch_block_every(m, corrupted, cache, metric, progress=False).shape == (3, c.n_layers, 6)


def test_patching_resid_pre_0_everywhere_gives_the_clean_metric():
    m, corrupted, cache = _setup("llama")
    clean_logits = m(tokens(2, 6, seed=2))
    out = P.patch_sweep(m, corrupted, cache, metric, ["blocks.0.hook_resid_pre"], by_pos=False, progress=False)
    assert abs(out.item() - metric(clean_logits).item()) < 1e-5


def test_shared_prefix_cells_equal_the_corrupted_metric():
    m, corrupted, cache = _setup("llama")
    out = P.get_act_patch_resid_pre(m, corrupted, cache, metric, progress=False)
    base = metric(m(corrupted)).item()
    assert torch.allclose(out[:, :2], torch.full_like(out[:, :2], base), atol=1e-6)


@pytest.mark.parametrize("patch", [ZeroPatch(), MeanPatch(reference=torch.randn(5, 6, 32))], ids=["zero", "mean"])
def test_ablation_sweeps_match_the_loop(patch):
    m, corrupted, _ = _setup("llama")
    names = [f"blocks.{L}.hook_resid_mid" for L in range(m.cfg.n_layers)]
    ref = P.patch_sweep(m, corrupted, None, metric, names, patch=patch, schedule="loop", progress=False)
    got = P.patch_sweep(m, corrupted, None, metric, names, patch=patch, progress=False)
    assert (got - ref).abs().max().item() <= 1e-4
    # the zero-ablation loop itself, by hand, for one cell
    if isinstance(patch, ZeroPatch):
        def zero(x, hook):
            x = x.clone()
            x[:, 3] = 0
            return x
        by_hand = metric(m.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_mid", zero)])).item()
        assert abs(ref[1, 3].item() - by_hand) < 1e-6


def test_bert_falls_back_to_batched_and_wavefront_raises():
    m, corrupted, cache = _setup("bert")
    mt = lambda h: h[:, -1, 0].mean()  # noqa: E731 (encoder: hidden states)
    ref = P.get_act_patch_resid_pre(m, corrupted, cache, mt, schedule="loop", progress=False)
    got = P.get_act_patch_resid_pre(m, corrupted, cache, mt, progress=False)
    assert (got - ref).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="cannot cut"):
        P.get_act_patch_resid_pre(m, corrupted, cache, mt, schedule="wavefront", progress=False)


def test_errors_are_loud():
    m, corrupted, cache = _setup("llama")
    with pytest.raises(KeyError, match="closest"):
        P.patch_sweep(m, corrupted, cache, metric, ["blocks.0.hook_resid_pree"], progress=False)
    with pytest.raises(ValueError, match="head dim"):
        P.patch_sweep(m, corrupted, cache, metric, ["blocks.0.hook_resid_pre"], by_head=True, progress=False)
    with pytest.raises(ValueError, match="scalar"):
        P.get_act_patch_resid_pre(m, corrupted, cache, lambda lg: lg[:, -1, 0], progress=False)
    with pytest.raises(ValueError, match="schedule"):
        P.get_act_patch_resid_pre(m, corrupted, cache, metric, schedule="fast", progress=False)


def test_max_memory_chunks_the_sweep_and_keeps_results(monkeypatch):
    m, corrupted, cache = _setup("llama")
    c = m.cfg
    row = 4 * (6 * (4 * c.d_model + 3 * c.d_mlp + c.n_heads * 6) + 2 * 1 * c.d_vocab)
    assert P.rows_for_memory(m, 6, 1, 10 * row) == 10
    assert P.rows_for_memory(m, 6, 1, 1) == 1
    assert P.parse_bytes("2MB") == 2_000_000 and P.parse_bytes("1.5 KiB") == 1536 and P.parse_bytes(7) == 7
    with pytest.raises(ValueError, match="memory size"):
        P.parse_bytes("lots")
    calls = []
    real = sweep.run_wavefront
    monkeypatch.setattr(sweep, "run_wavefront", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    ref = P.get_act_patch_resid_pre(m, corrupted, cache, metric, logits_at=-1, progress=False)
    n_default = len(calls)
    calls.clear()
    got = P.get_act_patch_resid_pre(m, corrupted, cache, metric, logits_at=-1, progress=False,
                                    max_memory=4 * corrupted.shape[0] * row)
    assert max(calls) == 4 and len(calls) > n_default  # 8 rows fit: 4 cells of batch 2 per forward
    assert (got - ref).abs().max().item() <= 1e-5


def test_compile_with_batched_schedule_needs_a_compiled_model():
    m, corrupted, cache = _setup("llama")
    with pytest.raises(ValueError, match="load the model with compile=True"):
        P.get_act_patch_resid_pre(m, corrupted, cache, metric, schedule="batched", compile=True, progress=False)


@pytest.mark.slow
def test_compiled_wavefront_matches_the_loop():
    m, corrupted, cache = _setup("llama")
    ref = P.get_act_patch_attn_out(m, corrupted, cache, metric, schedule="loop", progress=False)
    got = P.get_act_patch_attn_out(m, corrupted, cache, metric, schedule="wavefront", compile=True,
                                   logits_at=-1, progress=False)
    assert (got - ref).abs().max().item() <= 1e-4


def test_positions_subset_and_clean_tokens_instead_of_a_cache():
    m, corrupted, cache = _setup("llama")
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out"]
    full = P.patch_sweep(m, corrupted, cache, metric, sites, progress=False)
    for schedule in ("loop", "wavefront", "batched"):
        some = P.patch_sweep(m, corrupted, cache, metric, sites, [4, -1, 1], schedule=schedule, progress=False)
        assert some.shape == (2, 3)
        assert (some - full[:, [4, 5, 1]]).abs().max().item() <= 1e-4, schedule
    from_tokens = P.patch_sweep(m, corrupted, tokens(2, 6, seed=2), metric, sites, progress=False)
    assert (from_tokens - full).abs().max().item() <= 1e-6
    zero = P.patch_sweep(m, corrupted, None, metric, sites, [1], patch=ZeroPatch(), progress=False)
    assert torch.equal(P.patch_sweep(m, corrupted, tokens(2, 6, seed=2), metric, sites, [1], patch=ZeroPatch(),
                                     progress=False), zero)  # clean tokens are unused with patch=
    with pytest.raises(ValueError, match="distinct indices"):
        P.patch_sweep(m, corrupted, cache, metric, sites, [6], progress=False)
    with pytest.raises(ValueError, match="distinct indices"):
        P.patch_sweep(m, corrupted, cache, metric, sites, [1, -5], progress=False)
    with pytest.raises(ValueError, match="by_pos=False"):
        P.patch_sweep(m, corrupted, cache, metric, sites, [1], by_pos=False, progress=False)
