"""``expand_sdpa``: one fused SDPA call becomes scores -> pattern -> z; outputs equal HF eager."""

from __future__ import annotations

import pytest
import torch

from fxlens.tracer.graph import SDPA_OPS, module_path
from fxlens.tracer.passes.attention import attn_pattern, attn_scores, attn_z, expand_sdpa
from tests.conftest import tokens, traced
from tests.tracer.passes.graphs import add_outputs, copy_graph, count, first, hf_logits, module

FAMILIES = ["llama", "gpt2", "gpt_neox", "opt", "bert"]
(SDPA,) = SDPA_OPS


@pytest.mark.parametrize("family", FAMILIES)
def test_expanding_one_sdpa_replaces_it_by_three_nodes(family):
    m = traced(family)
    graph, _ = copy_graph(m.base_graph)
    sdpas = [n for n in graph.nodes if n.target is SDPA]
    assert len(sdpas) == m.cfg.n_layers
    before = len(graph.nodes)
    made = expand_sdpa(graph, sdpas[0])
    assert count(graph, SDPA) == m.cfg.n_layers - 1
    assert [count(graph, f) for f in (attn_scores, attn_pattern, attn_z)] == [1, 1, 1]
    assert len(graph.nodes) == before + 2
    assert {k: n.target for k, n in made.items()} == {"hook_attn_scores": attn_scores, "hook_pattern": attn_pattern,
                                                      "hook_z": attn_z}
    assert {module_path(n) for n in made.values()} == {module_path(sdpas[0])}
    ids = tokens(2, 7)
    got = first(module(m.base_graph, graph)(ids, torch.ones_like(ids)))
    assert (got - hf_logits(m, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_expanded_patterns_equal_hf_eager_attentions(family):
    m = traced(family)
    graph, _ = copy_graph(m.base_graph)
    patterns = [expand_sdpa(graph, n)["hook_pattern"] for n in [n for n in graph.nodes if n.target is SDPA]]
    assert count(graph, SDPA) == 0 and count(graph, attn_pattern) == m.cfg.n_layers
    add_outputs(graph, *patterns)
    ids = tokens(2, 7)
    logits, *got = module(m.base_graph, graph)(ids, torch.ones_like(ids))
    hf = m.hf_model
    impl = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        ref = hf_logits(m, ids, output_attentions=True)
        with torch.no_grad():
            attentions = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True).attentions
    finally:
        hf.set_attn_implementation(impl)
    assert (logits - ref).abs().max().item() <= 1e-5
    for L, (p, a) in enumerate(zip(got, attentions)):
        assert p.shape == a.shape == (2, m.cfg.n_heads, 7, 7), L
        assert (p - a).abs().max().item() <= 1e-6, L


def test_fully_masked_rows_give_zero_patterns_not_nan():
    q = torch.randn(1, 2, 3, 4)
    mask = torch.tensor([False, True, True]).expand(3, 3).clone()
    mask[0] = False  # query 0 sees no key (a left-padded row)
    pattern = attn_pattern(attn_scores(q, q, mask, None, False))
    assert torch.equal(pattern[0, :, 0], torch.zeros(2, 3))
    assert torch.allclose(pattern[0, :, 1:].sum(-1), torch.ones(2, 2))
