"""circuitsvis renders fxlens' attention patterns as they come out of the cache (no conversion)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.conftest import tokens, traced

cv = pytest.importorskip("circuitsvis", reason="circuitsvis not installed (pip install circuitsvis)")


def _props(html) -> dict:
    """The props circuitsvis serialised into its CDN HTML (what the browser receives)."""
    src = html.cdn_src
    return json.loads(re.search(r"render\(\s*\"[^\"]+\",\s*\w+,\s*(\{.*\})\s*\)\s*</script>", src, re.S).group(1))


def _eager_attentions(m, ids) -> tuple[torch.Tensor, ...]:
    impl = m.hf_model.config._attn_implementation
    m.hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
    finally:
        m.hf_model.set_attn_implementation(impl)


@pytest.mark.parametrize("view", ["attention_patterns", "attention_heads"])
def test_circuitsvis_renders_fxlens_patterns_equal_to_hf_eager(view):
    m = traced("llama")
    ids = tokens(1, 6)
    with torch.no_grad():
        _, cache = m.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    strs = [f"t{i}" for i in ids[0].tolist()]
    pattern = cache["pattern", 1][0]  # [head, q, k], straight from the cache
    html = (cv.attention.attention_patterns(tokens=strs, attention=pattern) if view == "attention_patterns"
            else cv.attention.attention_heads(attention=pattern, tokens=strs))
    props = _props(html)
    assert props["tokens"] == strs
    shown = torch.tensor(props["attention"])
    assert shown.shape == (m.cfg.n_heads, 6, 6)
    ref = _eager_attentions(m, ids)[1][0]
    assert (shown - ref).abs().max().item() <= 1e-5
    assert (shown.sum(-1) - 1).abs().max().item() <= 1e-5
