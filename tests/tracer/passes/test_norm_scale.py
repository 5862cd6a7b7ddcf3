"""``expose_norm`` / ``normalized_node``: a norm's scale and normalised vector become nodes; outputs equal HF."""

from __future__ import annotations

import pytest
import torch

from fxlens.tracer.graph import module_path
from fxlens.tracer.passes.norm_scale import expose_norm, ln_affine, ln_normalize, ln_scale, normalized_node
from tests.conftest import tokens, traced
from tests.tracer.passes.graphs import add_outputs, copy_graph, count, hf_logits, module

aten = torch.ops.aten


def _module_io(m, path: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the HF module at ``path`` in an eager forward."""
    seen = {}
    handle = m.hf_model.get_submodule(path).register_forward_hook(
        lambda mod, args, out: seen.update(x=args[0], y=out))
    try:
        hf_logits(m, ids)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rsqrt_norm_gains_two_reciprocals(family):
    m = traced(family)
    graph, _ = copy_graph(m.base_graph)
    rsqrts = [n for n in graph.nodes if n.target is aten.rsqrt.default]
    assert len(rsqrts) == 2 * m.cfg.n_layers + 1  # ln1 and ln2 of every block, ln_final
    assert all(normalized_node(op) is not None for op in rsqrts)
    before = len(graph.nodes)
    op = rsqrts[0]
    parts, replaced = expose_norm(graph, op)
    assert replaced is None and set(parts) == {"hook_scale"}
    assert count(graph, torch.reciprocal) == 2 and count(graph, aten.rsqrt.default) == len(rsqrts)
    assert len(graph.nodes) == before + 2
    add_outputs(graph, parts["hook_scale"])
    ids = tokens(2, 7)
    logits, scale = module(m.base_graph, graph)(ids, torch.ones_like(ids))
    assert (logits - hf_logits(m, ids)).abs().max().item() <= 1e-5
    x, _ = _module_io(m, module_path(op), ids)
    eps = m.hf_model.get_submodule(module_path(op)).variance_epsilon
    ref = (x.float().pow(2).mean(-1, keepdim=True) + eps).sqrt()
    assert scale.shape == (2, 7, 1)
    assert ((scale - ref).abs() / ref).max().item() <= 1e-6


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "bert"])
def test_fused_layer_norm_becomes_scale_normalize_affine(family):
    m = traced(family)
    graph, _ = copy_graph(m.base_graph)
    lns = [n for n in graph.nodes if n.target is aten.layer_norm.default]
    assert len(lns) == 2 * m.cfg.n_layers + 1  # two per block, and the final (BERT: the embeddings') norm
    before = len(graph.nodes)
    op = lns[0]
    path, eps = module_path(op), op.args[4] if len(op.args) > 4 else 1e-5
    parts, replaced = expose_norm(graph, op)
    assert set(parts) == {"hook_scale", "hook_normalized"} and replaced.target is ln_affine
    assert count(graph, aten.layer_norm.default) == len(lns) - 1
    assert [count(graph, f) for f in (ln_scale, ln_normalize, ln_affine)] == [1, 1, 1]
    assert len(graph.nodes) == before + 2
    add_outputs(graph, parts["hook_scale"], parts["hook_normalized"], replaced)
    ids = tokens(2, 7)
    logits, scale, normalized, y = module(m.base_graph, graph)(ids, torch.ones_like(ids))
    assert (logits - hf_logits(m, ids)).abs().max().item() <= 1e-5
    x, ref_y = _module_io(m, path, ids)
    ref_scale = (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    assert (scale - ref_scale).abs().max().item() <= 1e-6
    assert (normalized - (x - x.mean(-1, keepdim=True)) / ref_scale).abs().max().item() <= 1e-5
    assert (y - ref_y).abs().max().item() <= 1e-5
