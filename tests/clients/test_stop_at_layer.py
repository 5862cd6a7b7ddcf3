"""``stop_at_layer`` stops computing: the stopped graph holds only the attention calls before the stop."""

from __future__ import annotations

import torch

from fxlens.tracer.specialise import Request
from tests.conftest import tokens, traced


def _sdpa_calls(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in gm.graph.nodes)


def test_stopped_graph_drops_later_attention_and_equals_hf():
    m = traced("llama")
    assert _sdpa_calls(m.base_graph) == m.cfg.n_layers
    assert [_sdpa_calls(m.specialised(Request(stop_at_layer=k))) for k in range(m.cfg.n_layers)] == [0, 1]
    stop, site = 1, "blocks.0.hook_resid_post"  # SAELens' call: the site's layer + 1
    assert _sdpa_calls(m.specialised(Request(cache=(site,), stop_at_layer=stop))) == stop
    ids = tokens(2, 6)
    with torch.no_grad():
        out, cache = m.run_with_cache(ids, names_filter=[site], stop_at_layer=stop)
        ref = m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    assert (out - ref.hidden_states[stop]).abs().max().item() <= 1e-5
    assert (cache[site] - ref.hidden_states[stop]).abs().max().item() <= 1e-5
