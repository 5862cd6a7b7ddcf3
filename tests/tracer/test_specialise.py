"""``specialise``: cache outputs, hook calls and ``stop_at_layer`` dead-code elimination, counted on the graph
and checked against HF eager."""

from __future__ import annotations

import pytest
import torch

from fxlens.hooks import run_hook
from fxlens.tracer.graph import SDPA_OPS, dead_code
from fxlens.tracer.specialise import Request
from tests.conftest import tokens, traced
from tests.tracer.passes.graphs import copy_graph, count, hf_logits

(SDPA,) = SDPA_OPS
FAMILIES = ["llama", "gpt2", "gpt_neox", "opt"]


def _hidden_states(m, ids):
    with torch.no_grad():
        return m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_at_layer_k_keeps_k_attention_calls(family):
    m = traced(family)
    n = m.cfg.n_layers
    ids = tokens(2, 7)
    hidden = _hidden_states(m, ids)
    assert count(m.base_graph.graph, SDPA) == n
    for k in range(n + 1):
        gm = m.specialised(Request(stop_at_layer=k))
        assert count(gm.graph, SDPA) == k, k  # n - k attention calls removed
        if k < n:  # the residual stream entering block k is HF's hidden_states[k]
            out = gm(ids, torch.ones_like(ids))[0]
            assert (out - hidden[k]).abs().max().item() <= 1e-5, k


def test_dead_code_drops_sdpa_that_fx_keeps():
    m = traced("llama")
    graph, nodes = copy_graph(m.base_graph)
    out = next(x for x in graph.nodes if x.op == "output")
    out.args = (nodes[m.sites["blocks.0.hook_resid_pre"].node],)  # nothing reads the attention any more
    graph.eliminate_dead_code()
    assert count(graph, SDPA) == m.cfg.n_layers  # fx counts SDPA impure (dropout RNG)
    dead_code(graph)
    assert count(graph, SDPA) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sites_become_outputs(family):
    m = traced(family)
    n = m.cfg.n_layers
    names = tuple(f"blocks.{L}.hook_resid_pre" for L in range(n)) + ("blocks.0.attn.hook_q",)
    gm = m.specialised(Request(cache=names))
    out = next(x for x in gm.graph.nodes if x.op == "output")
    assert len(out.args[0]) == 1 + len(names)
    views = sum(m.sites[x].layout != "same" for x in names)  # one reshape node per site not in site shape
    assert len(gm.graph.nodes) == len(m.base_graph.graph.nodes) + views
    ids = tokens(2, 7)
    logits, *cached = gm(ids, torch.ones_like(ids))
    assert (logits - hf_logits(m, ids)).abs().max().item() <= 1e-5
    hidden = _hidden_states(m, ids)
    for L in range(n):
        assert (cached[L] - hidden[L]).abs().max().item() <= 1e-5, L
    assert cached[-1].shape == (2, 7, m.cfg.n_heads, m.cfg.d_head)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_hooked_site_gets_one_hook_call(family):
    m = traced(family)
    hooked = frozenset({"blocks.0.hook_resid_mid", "blocks.0.hook_mlp_in", "blocks.1.attn.hook_pattern",
                        "blocks.1.hook_mlp_out"} & set(m.all_hook_names))
    gm = m.specialised(Request(hooks=hooked))
    assert count(gm.graph, run_hook) == len(hooked)
    assert {x.args[0] for x in gm.graph.nodes if x.target is run_hook} == hooked
    scoped = sum(bool(m.sites[x].extra.get("scope")) for x in hooked)  # hook_mlp_in gets a copy
    assert count(gm.graph, torch.clone) == scoped
    ids = tokens(2, 7)
    seen = []
    logits = m.run_with_hooks(ids, fwd_hooks=[(x, lambda t, hook: seen.append(hook.name)) for x in hooked])
    assert sorted(seen) == sorted(hooked)
    assert (logits - hf_logits(m, ids)).abs().max().item() <= 1e-5
