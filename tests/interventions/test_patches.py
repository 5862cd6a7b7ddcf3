"""Patch vocabulary: values against hand-written hooks; model.patch contexts; name checks."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions.patches import AddPatch, MeanPatch, ReplacePatch, ResamplePatch, ZeroPatch
from tests.conftest import tokens, traced


def _by_hand(m, ids, name, fn):
    def hook(x, hook):
        x = x.clone()
        fn(x)
        return x
    return m.run_with_hooks(ids, fwd_hooks=[(name, hook)])


def test_zero_head_neuron_and_position_ablations_match_hand_written_hooks():
    m = traced("llama")
    ids = tokens(2, 6)
    cases = [
        ("blocks.1.attn.hook_z", ZeroPatch(head=2), lambda x: x[:, :, 2].zero_()),
        ("blocks.0.mlp.hook_post", ZeroPatch(neuron=[3, 7]), lambda x: x.__setitem__((..., [3, 7]), 0)),
        ("blocks.0.hook_resid_post", ZeroPatch(pos=4), lambda x: x[:, 4].zero_()),
        ("blocks.1.attn.hook_pattern", ZeroPatch(head=1, pos=slice(2, 4)), lambda x: x[:, 1, 2:4].zero_()),
    ]
    for name, patch, fn in cases:
        expected = _by_hand(m, ids, name, lambda x, fn=fn: x.copy_(_apply(x, fn)))
        got = m.run_with_hooks(ids, fwd_hooks=[(name, patch)])
        torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=name)
        assert (got - m(ids)).abs().max() > 1e-4, name


def _apply(x, fn):
    y = x.clone()
    fn(y)
    return y


def test_mean_resample_replace_add():
    m = traced("gpt2")
    ids = tokens(2, 6)
    name = "blocks.0.hook_mlp_out"
    _, ref = m.run_with_cache(tokens(5, 6, seed=9), names_filter=name)
    mean = ref[name].mean(0)
    got = m.run_with_hooks(ids, fwd_hooks=[(name, MeanPatch(reference=ref[name], pos=[1, 2]))])
    exp = _by_hand(m, ids, name, lambda x: x.__setitem__((slice(None), [1, 2]), mean[[1, 2]]))
    torch.testing.assert_close(got, exp, atol=0, rtol=0)
    rs = ResamplePatch(source=ref[name], seed=4)
    rows = torch.randint(0, 5, (2,), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(m.run_with_hooks(ids, fwd_hooks=[(name, rs)]),
                               _by_hand(m, ids, name, lambda x: x.copy_(ref[name][rows])), atol=0, rtol=0)
    val = torch.randn(32)
    torch.testing.assert_close(m.run_with_hooks(ids, fwd_hooks=[(name, ReplacePatch(value=val, pos=0))]),
                               _by_hand(m, ids, name, lambda x: x[:, 0].copy_(val)), atol=0, rtol=0)
    v = torch.randn(32)
    torch.testing.assert_close(m.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre",
                                                                 AddPatch(vector=v, scale=2.5))]),
                               _by_hand(m, ids, "blocks.1.hook_resid_pre", lambda x: x.add_(2.5 * v)),
                               atol=1e-6, rtol=1e-6)


def test_patch_contexts_nest_and_survive_run_with_hooks():
    m = traced("llama")
    ids = tokens(1, 5)
    base = m(ids)
    a, b = "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"
    only_a = m.run_with_hooks(ids, fwd_hooks=[(a, ZeroPatch())])
    both = m.run_with_hooks(ids, fwd_hooks=[(a, ZeroPatch()), (b, ZeroPatch(head=0))])
    with m.patch({a: ZeroPatch()}):
        torch.testing.assert_close(m(ids), only_a)
        with m.patch({b: [ZeroPatch(head=0)]}):
            torch.testing.assert_close(m(ids), both)
            m.run_with_hooks(ids, fwd_hooks=[(a, lambda x, hook: None)])  # removes its own hooks only
            torch.testing.assert_close(m(ids), both)
        torch.testing.assert_close(m(ids), only_a)
    torch.testing.assert_close(m(ids), base)


def test_patch_names_are_checked_before_anything_applies():
    m = traced("llama")
    with pytest.raises(KeyError, match="closest"):
        with m.patch({"blocks.0.hook_mlp_out": ZeroPatch(), "blocks.0.hook_mlp_outt": ZeroPatch()}):
            pass
    assert m.active_hooks() == []
    with pytest.raises(ValueError, match="head"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[("blocks.0.hook_resid_pre", ZeroPatch(head=1))])
