"""``build_split_inputs``: one block's q/k/v read per-head copies of the residual stream; outputs equal HF."""

from __future__ import annotations

import pytest
import torch

from fxlens.tracer.graph import dead_code, module_path
from fxlens.tracer.passes.split_inputs import build_split_inputs, pick_head_features, repeat_heads
from tests.conftest import tokens, traced
from tests.tracer.passes.graphs import add_outputs, copy_graph, count, hf_logits, module

aten = torch.ops.aten


def _projections(graph, op, path: str) -> list:
    return [n for n in graph.nodes if n.target is op and module_path(n) == path]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_q_input_gets_its_own_projection_call(family):
    m = traced(family)
    sites = m.sites
    q = sites["blocks.0.attn.hook_q"]
    ln, proj = sites["blocks.0.hook_attn_in"].extra["ln"], q.extra["proj_module"]
    graph, nodes = copy_graph(m.base_graph)
    op = nodes[q.extra["proj"]].target  # linear, or addmm (GPT-2's Conv1D)
    fused = q.extra["proj"] == sites["blocks.0.attn.hook_k"].extra["proj"]  # one q/k/v projection
    assert len(_projections(graph, op, proj)) == 1
    attrs, replaced = {}, {}
    made = build_split_inputs(graph, nodes, sites, 0, {"blocks.0.hook_q_input"}, m.split_index(), attrs, replaced)
    assert set(made) == {"blocks.0.hook_q_input"} and list(replaced) == [q.node]
    assert count(graph, repeat_heads) == 1 and count(graph, pick_head_features) == 1
    assert sorted(n.target for n in graph.nodes if n.op == "call_module") == sorted(filter(None, (ln, proj)))
    dead_code(graph)
    assert q.node not in {n.name for n in graph.nodes}
    # a q-only projection is gone; a fused one still computes k and v
    assert len(_projections(graph, op, proj)) == (1 if fused else 0)
    assert fused == (family != "llama")
    add_outputs(graph, made["blocks.0.hook_q_input"])
    extra = {k: (v if v is not None else m.hf_model.get_submodule(k)) for k, v in attrs.items()}
    ids = tokens(2, 7)
    logits, q_input = module(m.base_graph, graph, extra)(ids, torch.ones_like(ids))
    assert (logits - hf_logits(m, ids)).abs().max().item() <= 1e-5
    with torch.no_grad():
        resid = m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
                           ).hidden_states[0]
    assert q_input.shape == (2, 7, m.cfg.n_heads, m.cfg.d_model)
    assert torch.equal(q_input, resid.unsqueeze(2).expand_as(q_input))
