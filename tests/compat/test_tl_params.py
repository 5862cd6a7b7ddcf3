"""``named_parameters()`` gives TransformerLens' names and shapes, with values from the HF parameters."""

from __future__ import annotations

import pytest
import torch

import fxlens
from fxlens import HookedTransformer
from tests.conftest import tiny_hf, traced

# The seed Main Demo's cell [24] output for GPT-2 (TransformerLens' HookedTransformer, folded norms).
_TL_BLOCK0 = ["W_Q", "W_O", "b_Q", "b_O", "W_K", "W_V", "b_K", "b_V"]
_TL_MLP0 = ["W_in", "b_in", "W_out", "b_out"]


def test_gpt2_block_and_embedding_names_are_the_seed_demos():
    hf = tiny_hf("gpt2")
    with pytest.warns(UserWarning, match="no tokenizer"):
        m = HookedTransformer.from_pretrained("tiny-gpt2", hf_model=hf, device="cpu")
    names = [n for n, _ in m.named_parameters()]
    assert [n for n in names if n.startswith("blocks.0.")] == (
        [f"blocks.0.attn.{n}" for n in _TL_BLOCK0] + [f"blocks.0.mlp.{n}" for n in _TL_MLP0])
    assert [n for n in names if not n.startswith("blocks")] == [
        "embed.W_E", "pos_embed.W_pos", "unembed.W_U", "unembed.b_U"]  # folded norms have no weights
    assert len(names) == 4 + 12 * m.cfg.n_layers


def test_shapes_and_values_come_from_the_hf_weights():
    m = traced("gpt2")
    p = dict(m.named_parameters())
    c = m.cfg
    assert p["blocks.1.attn.W_Q"].shape == (c.n_heads, c.d_model, c.d_head)
    assert p["blocks.1.attn.W_O"].shape == (c.n_heads, c.d_head, c.d_model)
    assert p["blocks.1.mlp.W_in"].shape == (c.d_model, c.d_mlp)
    # GPT-2's fused c_attn (Conv1D, [d_model, 3 * d_model]): query columns of head h
    c_attn = m.hf_model.transformer.h[1].attn.c_attn.weight
    h = 2
    torch.testing.assert_close(p["blocks.1.attn.W_Q"][h], c_attn[:, h * c.d_head:(h + 1) * c.d_head])
    torch.testing.assert_close(p["blocks.1.ln2.w"], m.hf_model.transformer.h[1].ln_2.weight.detach())
    assert [n for n in p if n.startswith("ln_final")] == ["ln_final.w", "ln_final.b"]
    assert p["embed.W_E"] is m.hf_model.transformer.wte.weight


def test_gqa_key_value_weights_use_tl_underscore_names():
    m = traced("llama")
    p = dict(m.named_parameters())
    c = m.cfg
    assert c.n_kv_heads < c.n_heads
    assert p["blocks.0.attn._W_K"].shape == (c.n_kv_heads, c.d_model, c.d_head)
    assert "blocks.0.attn.W_K" not in p and "blocks.0.mlp.W_gate" in p
    k_proj = m.hf_model.model.layers[0].self_attn.k_proj.weight  # [n_kv * d_head, d_model]
    torch.testing.assert_close(p["blocks.0.attn._W_V"].shape, p["blocks.0.attn._W_K"].shape)
    torch.testing.assert_close(p["blocks.0.attn._W_K"][1], k_proj[c.d_head:2 * c.d_head].T)
    assert "blocks.0.ln1.w" in p and "blocks.0.ln1.b" not in p  # RMSNorm: TL's RMSNorm has w only


def test_inplace_edit_of_a_derived_weight_raises_and_real_ones_reach_the_model():
    m = fxlens.trace(tiny_hf("gpt2"))
    p = dict(m.named_parameters())
    for edit in (lambda t: t.zero_(), lambda t: t[0].mul_(2), lambda t: t.data.add_(1),
                 lambda t: t.__setitem__(0, 0.0), lambda t: torch.nn.init.zeros_(t)):
        with torch.no_grad(), pytest.raises(RuntimeError, match="blocks.0.attn.W_Q is computed from the "
                                                                  "HuggingFace parameters.*Edit the HF parameter"):
            edit(p["blocks.0.attn.W_Q"])
    copy = p["blocks.0.attn.W_Q"].clone()
    copy.zero_()  # a clone is the caller's own tensor
    assert type(copy) is torch.Tensor and m.W_Q[0].abs().sum() > 0
    ids = torch.tensor([[5, 6, 7]])
    before = m(ids)
    with torch.no_grad():
        p["unembed.W_U"][:, 5] += 1.0  # a view of lm_head.weight (tied to wte): reaches the model
    torch.testing.assert_close(m(ids), m.hf_model(input_ids=ids).logits)
    assert not torch.equal(before, m(ids))


def test_a_block_without_ln1_has_no_ln1_weights():
    """A family rule with ``ln1=None`` (no pre-attention norm): ``blocks[L].ln1`` is absent, not the block."""
    import dataclasses

    m = fxlens.trace(tiny_hf("llama"))
    m.family = dataclasses.replace(m.family, ln1=None)
    assert not m.blocks[0].ln1.exists
    with pytest.raises(AttributeError, match="this model has no blocks\\[0\\].ln1"):
        m.blocks[0].ln1.w
    assert "blocks.0.ln1.w" not in dict(m.named_parameters())
