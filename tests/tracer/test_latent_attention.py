"""Multi-head latent attention (DeepSeek V2/V3 MLA): q/k/v at the attention inputs, checked, no W_Q/W_K/W_V."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from tiny_configs import tiny_config  # noqa: E402

import fxlens  # noqa: E402
from fxlens.check import check_sites  # noqa: E402


@pytest.fixture(scope="module")
def mla():
    """DeepSeek V3 with value heads narrower than query/key heads (8 vs 16), all MLPs dense."""
    import transformers

    cfg = tiny_config("deepseek_v3")
    cfg.v_head_dim, cfg.first_k_dense_replace = 8, 2
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    return hf, fxlens.trace(hf, graph_cache=False)


def test_keys_filled_by_slice_copies_are_one_concat(mla):
    _, m = mla
    targets = {str(n.target) for n in m.base_graph.graph.nodes}
    assert "aten.new_empty.default" not in targets and "aten.copy_.default" not in targets


def test_qkv_are_the_attention_inputs_and_match_hf(mla):
    hf, m = mla
    ids = torch.randint(3, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(ids)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 7, 4, 16)
    assert cache["blocks.0.attn.hook_k"].shape == (2, 7, 4, 16)
    assert cache["blocks.0.attn.hook_v"].shape == cache["blocks.0.attn.hook_z"].shape == (2, 7, 4, 8)
    assert not any("hook_rot_" in n or n.endswith("_input") or n.endswith("attn_in") for n in m.all_hook_names)
    res = check_sites(m, ids)
    assert res.ok, res.summary()
    assert res.classes["qkv"].n == 6 and res.classes["heads"].ok


def test_a_hook_on_the_key_reaches_attention(mla):
    _, m = mla
    ids = torch.randint(3, 250, (1, 5), generator=torch.Generator().manual_seed(1))
    clean = m(ids)
    zeroed = m.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_k", lambda x, hook: torch.zeros_like(x))])
    _, cache = m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_pattern"])
    with m.hooks(fwd_hooks=[("blocks.0.attn.hook_k", lambda x, hook: torch.zeros_like(x))]):
        _, zcache = m.run_with_cache(ids, names_filter=["blocks.0.attn.hook_pattern"])
    assert not torch.allclose(clean, zeroed)
    uniform = torch.tril(torch.ones(5, 5)) / torch.arange(1, 6)[:, None]  # zero keys: equal scores
    torch.testing.assert_close(zcache["blocks.0.attn.hook_pattern"][0, 0], uniform)
    assert not torch.allclose(cache["blocks.0.attn.hook_pattern"][0, 0], uniform)


@pytest.mark.parametrize("name", ["W_Q", "W_K", "W_V", "b_K", "W_K_kv", "QK", "OV"])
def test_qkv_weights_refuse(mla, name):
    _, m = mla
    with pytest.raises(ValueError, match="multi-head latent attention"):
        getattr(m, name)


def test_output_weights_and_tl_parameters_remain(mla):
    _, m = mla
    assert m.W_O.shape == (2, 4, 8, 64)
    names = [n for n, _ in m.named_parameters()]
    assert "blocks.0.attn.W_O" in names and not any(".W_K" in n or ".W_Q" in n or ".W_V" in n for n in names)
