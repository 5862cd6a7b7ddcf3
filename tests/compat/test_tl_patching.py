"""Every helper of TransformerLens' ``patching`` module: TL's shapes, and values equal to TL's own loop."""

from __future__ import annotations

import pytest
import torch

from fxlens import patching
from fxlens.cache import act_name
from tests.conftest import tokens, traced


def _metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 9].mean()


def _tl_loop(m, corrupt, cache, setter, act, axes):
    """TransformerLens' generic_activation_patch, literally: one run_with_hooks per index row."""
    heads = m.cfg.n_kv_heads if act in ("k", "v") else m.cfg.n_heads
    rng = {"layer": m.cfg.n_layers, "pos": corrupt.shape[-1], "dest_pos": corrupt.shape[-1],
           "src_pos": corrupt.shape[-1], "head": heads, "head_index": heads}
    out = torch.zeros([rng[a] for a in axes])
    for index in torch.cartesian_prod(*[torch.arange(rng[a]) for a in axes]).reshape(-1, len(axes)).tolist():
        name = act_name(act, index[0])
        hook = lambda x, hook, i=index, n=name: setter(x.clone(), i, cache[n])  # noqa: E731
        with torch.no_grad():
            out[tuple(index)] = _metric(m.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])).item()
    return out


CASES = [
    ("get_act_patch_resid_pre", patching.layer_pos_patch_setter, "resid_pre", ("layer", "pos"), None),
    ("get_act_patch_resid_mid", patching.layer_pos_patch_setter, "resid_mid", ("layer", "pos"), None),
    ("get_act_patch_attn_out", patching.layer_pos_patch_setter, "attn_out", ("layer", "pos"), None),
    ("get_act_patch_mlp_out", patching.layer_pos_patch_setter, "mlp_out", ("layer", "pos"), None),
    ("get_act_patch_attn_head_out_by_pos", patching.layer_pos_head_vector_patch_setter, "z",
     ("layer", "pos", "head"), None),
    ("get_act_patch_attn_head_q_by_pos", patching.layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"),
     None),
    ("get_act_patch_attn_head_k_by_pos", patching.layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"),
     None),
    ("get_act_patch_attn_head_v_by_pos", patching.layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"),
     None),
    ("get_act_patch_attn_head_pattern_by_pos", patching.layer_head_pos_pattern_patch_setter, "pattern",
     ("layer", "head_index", "dest_pos"), None),
    ("get_act_patch_attn_head_pattern_dest_src_pos", patching.layer_head_dest_src_pos_pattern_patch_setter,
     "pattern", ("layer", "head_index", "dest_pos", "src_pos"), None),
    ("get_act_patch_attn_head_out_all_pos", patching.layer_head_vector_patch_setter, "z", ("layer", "head"), None),
    ("get_act_patch_attn_head_q_all_pos", patching.layer_head_vector_patch_setter, "q", ("layer", "head"), None),
    ("get_act_patch_attn_head_k_all_pos", patching.layer_head_vector_patch_setter, "k", ("layer", "head"), None),
    ("get_act_patch_attn_head_v_all_pos", patching.layer_head_vector_patch_setter, "v", ("layer", "head"), None),
    ("get_act_patch_attn_head_pattern_all_pos", patching.layer_head_pattern_patch_setter, "pattern",
     ("layer", "head_index"), None),
]


@pytest.fixture(scope="module")
def setup():
    m = traced("llama")  # GQA: 4 query heads, 2 KV heads
    clean, corrupt = tokens(1, 5, seed=2), tokens(1, 5, seed=3)  # 5 positions, 4 heads: axes cannot be confused
    corrupt[0, :1] = clean[0, :1]  # a shared first token: some cells are answered without compute
    _, cache = m.run_with_cache(clean)
    return m, corrupt, cache


@pytest.mark.parametrize(("fn", "setter", "act", "axes", "_"), CASES, ids=[c[0] for c in CASES])
def test_helper_equals_transformer_lens_loop(setup, fn, setter, act, axes, _):
    m, corrupt, cache = setup
    ref = _tl_loop(m, corrupt, cache, setter, act, axes)
    got = getattr(patching, fn)(m, corrupt, cache, _metric, progress=False)
    assert tuple(got.shape) == tuple(ref.shape)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_every_stacks_match_their_parts(setup):
    m, corrupt, cache = setup
    every = patching.get_act_patch_attn_head_all_pos_every(m, corrupt, cache, _metric, progress=False)
    assert tuple(every.shape) == (5, m.cfg.n_layers, m.cfg.n_heads)
    k = patching.get_act_patch_attn_head_k_all_pos(m, corrupt, cache, _metric, progress=False)
    torch.testing.assert_close(every[2, :, : m.cfg.n_kv_heads], k)
    assert every[2, :, m.cfg.n_kv_heads:].abs().max() == 0
    by_pos = patching.get_act_patch_attn_head_by_pos_every(m, corrupt, cache, _metric, progress=False)
    assert tuple(by_pos.shape) == (5, m.cfg.n_layers, corrupt.shape[1], m.cfg.n_heads)
    block = patching.get_act_patch_block_every(m, corrupt, cache, _metric, progress=False)
    torch.testing.assert_close(block[1], patching.get_act_patch_attn_out(m, corrupt, cache, _metric, progress=False))


def test_generic_with_a_custom_setter_and_an_index_df(setup):
    pd = pytest.importorskip("pandas")
    m, corrupt, cache = setup

    def half(corrupted, index, clean):  # not a TL setter: runs as given on each variant
        corrupted[:, index[1]] = 0.5 * (corrupted[:, index[1]] + clean[:, index[1]])
        return corrupted

    df = pd.DataFrame({"layer": [0, 1, 1], "pos": [3, 0, 2]})
    got, back = patching.generic_activation_patch(m, corrupt, cache, _metric, half, "resid_pre", index_df=df,
                                                  return_index_df=True, progress=False)
    full = _tl_loop(m, corrupt, cache, half, "resid_pre", ("layer", "pos"))
    torch.testing.assert_close(got, torch.stack([full[0, 3], full[1, 0], full[1, 2]]), atol=1e-4, rtol=1e-4)
    assert back is df
