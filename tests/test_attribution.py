"""Attribution patching equals the first-order estimate computed with autograd on the HF model, and
cells with equal clean / corrupted activations get exactly the corrupted metric."""

from __future__ import annotations

import pytest
import torch

import fxlens
from fxlens import patching
from tests.conftest import tiny_hf


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 5].sum() - logits[:, -1, 7].sum()


def _pair():
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, 100, (2, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = torch.randint(3, 100, (2,), generator=g)  # positions 0-3 agree
    return clean, corrupted


def _hf_estimates(hf, o_projs, clean, corrupted, d_head):
    """resid_pre [L, pos] and head-out [L, H] estimates from HF hidden_states / o_proj inputs + autograd."""
    def run(ids, grad: bool):
        z_in = []
        hooks = [o.register_forward_pre_hook(lambda mod, args: z_in.append(args[0])) for o in o_projs]
        try:
            with torch.set_grad_enabled(grad):
                out = hf(input_ids=ids, output_hidden_states=True)
        finally:
            for h in hooks:
                h.remove()
        return out, z_in

    clean_out, clean_z = run(clean, False)
    out, z = run(corrupted, True)
    hs = out.hidden_states[:-1]  # resid_pre of each block
    metric = _metric(out.logits)
    grads = torch.autograd.grad(metric, [*hs, *z])
    n = len(hs)
    resid = torch.stack([((clean_out.hidden_states[L] - hs[L]) * grads[L]).sum((0, 2)) for L in range(n)])
    heads = torch.stack([((clean_z[L] - z[L]) * grads[n + L]).unflatten(-1, (-1, d_head)).sum((0, 1, 3))
                         for L in range(n)])
    return metric.detach() + resid, metric.detach() + heads


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_estimates_equal_hf_autograd(family):
    hf = tiny_hf(family)
    m = fxlens.trace(hf)
    clean, corrupted = _pair()
    got = patching.attribution_patch(m, corrupted, clean, _metric, sites=["resid_pre", "attn_head_out_all_pos"])
    layers = hf.model.layers if family == "llama" else hf.transformer.h
    o_projs = [blk.self_attn.o_proj if family == "llama" else blk.attn.c_proj for blk in layers]
    resid, heads = _hf_estimates(hf, o_projs, clean, corrupted, m.cfg.d_head)
    assert got["resid_pre"].shape == (m.cfg.n_layers, 7) and got["attn_head_out_all_pos"].shape == (
        m.cfg.n_layers, m.cfg.n_heads)
    torch.testing.assert_close(got["resid_pre"], resid, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["attn_head_out_all_pos"], heads, atol=1e-4, rtol=1e-4)
    corrupt_metric = _metric(m(corrupted)).item()
    torch.testing.assert_close(got["resid_pre"][:, :4], torch.full((m.cfg.n_layers, 4), corrupt_metric),
                               atol=1e-5, rtol=0)  # positions where clean and corrupted agree


def test_every_grid_has_the_exact_sweeps_shape_and_linear_cells_match_it():
    m = fxlens.trace(tiny_hf("llama"))
    clean, corrupted = _pair()
    _, cache = m.run_with_cache(clean)
    est = patching.attribution_patch(m, corrupted, cache, _metric, sites=list(patching.ATTRIBUTION_GRIDS))
    exact = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
             "attn_head_v_by_pos": patching.get_act_patch_attn_head_v_by_pos,
             "attn_head_pattern_by_pos": patching.get_act_patch_attn_head_pattern_by_pos,
             "attn_head_out_all_pos": patching.get_act_patch_attn_head_out_all_pos}
    for grid, fn in exact.items():
        ref = fn(m, corrupted, cache, _metric, progress=False)
        assert est[grid].shape == ref.shape, grid
    # the last block's attn_out enters the logits linearly through the final norm only: the estimate
    # is close to the exact patch there; at the last layer's resid_pre it is a first-order estimate
    ref = patching.get_act_patch_attn_out(m, corrupted, cache, _metric, progress=False)
    assert torch.corrcoef(torch.stack([est["attn_out"].flatten(), ref.flatten()]))[0, 1] > 0.9


def test_bad_arguments_are_named():
    m = fxlens.trace(tiny_hf("llama"))
    clean, corrupted = _pair()
    with pytest.raises(ValueError, match="unknown attribution grids \\['resid'\\]"):
        patching.attribution_patch(m, corrupted, clean, _metric, sites=["resid"])
    with pytest.raises(ValueError, match="scalar tensor"):
        patching.attribution_patch(m, corrupted, clean, lambda logits: logits[:, -1], sites="resid_pre")
    _, partial_cache = m.run_with_cache(clean, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(KeyError, match="lacks \\['blocks.1.hook_resid_pre'\\]"):
        patching.attribution_patch(m, corrupted, partial_cache, _metric, sites="resid_pre")
    with pytest.raises(ValueError, match="same batch size and length"):
        patching.attribution_patch(m, corrupted[:, :5], clean, _metric, sites="resid_pre")
