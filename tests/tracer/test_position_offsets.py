"""The mask-positions pass keeps the model's own position index (offsets included) on unpadded input."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens
from tests.conftest import tokens

_BIOGPT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64)
_MBART = dict(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
              decoder_ffn_dim=64, encoder_ffn_dim=64, max_position_embeddings=64)


@pytest.mark.parametrize("model_type,kw", [("biogpt", _BIOGPT), ("mbart", _MBART)])
def test_position_offset_is_kept(model_type, kw):
    """BioGPT and mBART index their position table from row 2; the pass used to drop the offset
    (logits off by 0.17 / 1.0, every site after the embedding wrong)."""
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, **kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    m = fxlens.trace(hf, graph_cache=False)
    ids = tokens(2, 6)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits, c = m.run_with_cache(ids, names_filter=["hook_pos_embed"])
    assert (logits - ref).abs().max().item() <= 1e-5
    table = hf.get_submodule(m.family.pos_embed).weight
    torch.testing.assert_close(c["hook_pos_embed"].expand(2, -1, -1)[0], table[2:8], atol=0, rtol=0)
