"""ActivationCache and run_with_cache options."""

from __future__ import annotations

import pytest
import torch

from fxlens import act_name
from tests.conftest import tokens, traced


def test_names_filter_forms_keep_only_requested_sites():
    m = traced("llama")
    ids = tokens(2, 5)
    _, one = m.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    _, some = m.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.attn.hook_pattern"])
    _, pred = m.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert list(one) == ["blocks.1.hook_resid_post"]
    assert list(some) == ["hook_embed", "blocks.0.attn.hook_pattern"]
    assert list(pred) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def test_shorthand_keys_and_act_name():
    m = traced("gpt2")
    _, cache = m.run_with_cache(tokens(1, 4))
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["scale", 0, "ln2"] is cache["blocks.0.ln2.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert act_name("normalized", None, "ln_final") == "ln_final.hook_normalized"
    assert ("resid_pre", 0) in cache and ("resid_pre", 9) not in cache
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.hook_resid_pree"]


def test_stop_at_layer_returns_the_residual_and_skips_later_sites():
    m = traced("llama")
    ids = tokens(2, 5)
    _, full = m.run_with_cache(ids, names_filter=lambda n: "resid" in n)
    out, cache = m.run_with_cache(ids, names_filter=lambda n: "resid" in n, stop_at_layer=1)
    assert torch.equal(out, full["resid_pre", 1])
    assert set(cache) == {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"}
    assert torch.equal(m(ids, stop_at_layer=-1), full["resid_pre", 1])
    with pytest.raises(ValueError, match="stops before"):
        m.run_with_cache(ids, names_filter=["blocks.1.hook_resid_pre"], stop_at_layer=1)


def test_remove_batch_dim_and_to():
    m = traced("gpt2")
    _, cache = m.run_with_cache(tokens(1, 4), remove_batch_dim=True)
    assert cache["resid_pre", 0].shape == (4, 32)
    assert cache.to("cpu")["resid_pre", 0].device.type == "cpu"
    _, batched = m.run_with_cache(tokens(2, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        batched.remove_batch_dim()


def test_loss_is_mean_next_token_cross_entropy():
    m = traced("gpt2")
    ids = tokens(2, 6)
    logits, loss = m(ids, return_type="both")
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref, atol=1e-6)
    assert m(ids, return_type=None) is None
    assert torch.allclose(m(ids, return_type="loss"), loss)


def test_cfg_reports_dimensions():
    c = traced("llama").cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab) == (2, 32, 4, 2, 8, 64, 128)
    assert (c.normalization_type, c.positional_embedding_type, c.family) == ("RMS", "rotary", "llama")
    g = traced("gpt2").cfg
    assert (g.normalization_type, g.positional_embedding_type, g.n_ctx) == ("LN", "standard", 64)


@pytest.mark.parametrize("short, full", [
    (("k", 6, "a"), "blocks.6.attn.hook_k"), (("pre", 2), "blocks.2.mlp.hook_pre"), (("embed",), "hook_embed"),
    (("normalized", 27, "ln2"), "blocks.27.ln2.hook_normalized"), (("k6",), "blocks.6.attn.hook_k"),
    (("scale4ln1",), "blocks.4.ln1.hook_scale"), (("pre5",), "blocks.5.mlp.hook_pre"),
    (("attn", 3), "blocks.3.attn.hook_pattern"), (("value", 0), "blocks.0.attn.hook_v"),
    (("attn_logits", 1), "blocks.1.attn.hook_attn_scores"), (("mlp_post", 1), "blocks.1.mlp.hook_post"),
    (("resid_pre", 4), "blocks.4.hook_resid_pre"), (("attn_out", 4, "b"), "blocks.4.hook_attn_out"),
    (("scale",), "ln_final.hook_scale"), (("normalized",), "ln_final.hook_normalized"),
    (("q_input", 2), "blocks.2.hook_q_input"), (("blocks.1.hook_resid_post",), "blocks.1.hook_resid_post"),
])
def test_get_act_name_follows_transformer_lens(short, full):
    """The examples of TransformerLens' get_act_name docstring and its aliases."""
    from fxlens import utils

    assert utils.get_act_name(*short) == full == act_name(*short)


def test_tl_cache_indexing_slicing_and_moving():
    m = traced("gpt2")
    ids = tokens(3, 5)
    _, c = m.run_with_cache(ids)
    n = m.cfg.n_layers
    assert c["resid_post", -1] is c[f"blocks.{n - 1}.hook_resid_post"]
    assert c["k1"] is c["blocks.1.attn.hook_k"] and c["scale1ln2"] is c["blocks.1.ln2.hook_scale"]
    assert c.cache_dict is c.cache_dict and set(c.cache_dict) == set(c.keys()) and c.has_embed and c.has_pos_embed
    assert repr(c).startswith("ActivationCache with keys ['hook_embed'")
    one = c.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one["resid_pre", 0], c["resid_pre", 0][1])
    assert one["pos_embed"].shape == c["pos_embed"].shape[-2:]  # broadcast entries lose their dim too
    two = c.apply_slice_to_batch_dim((0, 2))
    assert two.has_batch_dim and torch.equal(two["pattern", 1], c["pattern", 1][:2])
    torch.testing.assert_close(two.decompose_resid(pos_slice=-1), c.decompose_resid(pos_slice=-1)[:, :2])
    last = c.apply_slice_to_pos_dim(-1)
    assert torch.equal(last["resid_pre", 1], c["resid_pre", 1][:, -1])
    assert torch.equal(last["pattern", 0], c["pattern", 0][:, :, -1])  # query positions
    assert torch.equal(one.apply_slice_to_pos_dim([0, 2])["z", 0], c["z", 0][1, [0, 2]])
    with pytest.raises(ValueError, match="without a batch dim"):
        one.apply_slice_to_batch_dim(0)
    assert c.to("cpu") is c  # in place, as TL
    single = m.run_with_cache(ids[:1])[1]
    assert single.remove_batch_dim() is single and not single.has_batch_dim  # in place, as TL
    assert single["resid_pre", 0].shape == (5, m.cfg.d_model)
    with pytest.raises(TypeError, match="model comes second"):
        type(c)(dict(c), True)
