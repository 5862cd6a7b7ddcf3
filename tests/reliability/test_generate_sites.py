"""A hook sees and changes the same tensor in generate as in the forward; positions are absolute."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens
from fxlens.interventions.patches import ZeroPatch
from tests.conftest import tokens, traced


def _greedy_by_graph(m, ids, hooks, n, from_len: int = 0):
    for _ in range(n):
        with torch.no_grad():
            logits = m.run_with_hooks(ids, fwd_hooks=hooks if ids.shape[1] > from_len else [])
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("pos", [0, 3])
def test_positional_patch_acts_on_absolute_positions(pos):
    m = traced("llama")
    ids = tokens(1, 5)
    hooks = [("blocks.0.hook_resid_post", ZeroPatch(pos=pos))]
    got = m.generate(ids, max_new_tokens=4, do_sample=False, stop_at_eos=False, fwd_hooks=hooks)
    assert torch.equal(got, _greedy_by_graph(m, ids, hooks, 4))


def test_patch_on_a_generated_position_applies_at_that_step_only():
    m = traced("llama")
    ids = tokens(1, 4)
    hooks = [("blocks.0.hook_resid_post", ZeroPatch(pos=5))]  # the second generated token is read at 5
    got = m.generate(ids, max_new_tokens=4, do_sample=False, stop_at_eos=False, fwd_hooks=hooks)
    assert torch.equal(got, _greedy_by_graph(m, ids, hooks, 4, from_len=5))
    assert not torch.equal(got, _greedy_by_graph(m, ids, [], 4))


def test_wrong_dtype_hook_result_raises_as_in_the_forward():
    m = traced("llama")
    with pytest.raises(ValueError, match="dtype torch.float32"):
        m.generate(tokens(1, 4), max_new_tokens=2, do_sample=False,
                   fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.double())])


def test_granite_scaled_attention_output_is_refused_in_generate():
    cfg = transformers.GraniteConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     residual_multiplier=0.25, embedding_multiplier=3.0, pad_token_id=0)
    torch.manual_seed(0)
    m = fxlens.trace(transformers.GraniteForCausalLM(cfg).eval(), graph_cache=False)
    ids = tokens(1, 4)
    with pytest.raises(ValueError, match="holds a different tensor than the site"):
        m.generate(ids, max_new_tokens=2, do_sample=False, fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: x)])
    seen = []  # the residual stream is the same tensor at the module boundary: allowed, and equal
    m.generate(ids, max_new_tokens=1, do_sample=False,
               fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x.clone()))])
    _, cache = m.run_with_cache(ids, names_filter="blocks.1.hook_resid_pre")
    torch.testing.assert_close(seen[0], cache["blocks.1.hook_resid_pre"], atol=1e-6, rtol=1e-6)


def test_tl_only_keywords_are_not_passed_to_hf():
    m = traced("llama")
    ids = tokens(1, 4)
    out = m.generate(ids, max_new_tokens=3, stop_at_eos=False, do_sample=True, top_k=5, temperature=0.7,
                     freq_penalty=0.5, use_past_kv_cache=False, verbose=False, return_type="tokens")
    assert out.shape == (1, 7)
