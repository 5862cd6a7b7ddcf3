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
