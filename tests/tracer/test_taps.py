"""The tap graph: one graph serves every cache-only request of captured-graph sites, with the values a
specialised graph gives."""

from __future__ import annotations

import threading

import torch

from fxlens.tracer.specialise import Request
from fxlens.tracer.taps import TapRun, build_tap_graph, tap, tappable
from tests.conftest import tokens, traced
from tests.tracer.passes.graphs import count, first, hf_logits


def test_tap_graph_equals_specialised_graphs(family):
    m = traced(family)
    plain = [n for n in m.all_hook_names if tappable(m.sites[n])]
    gm = build_tap_graph(m.base_graph, m.sites)
    assert count(gm.graph, tap) == len(plain)
    assert len(gm.graph.nodes) == len(m.base_graph.graph.nodes) + len(plain)
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(first(gm(ids, mask)), first(m.base_graph(ids, mask)))
        assert (first(gm(ids, mask)) - hf_logits(m, ids)).abs().max().item() <= 1e-5
        got = TapRun(gm, m.sites, plain)(ids, mask)
        ref = m.specialised(Request(cache=tuple(plain)))(ids, mask)
    assert len(got) == len(ref) == 1 + len(plain)
    for name, a, b in zip(["out", *plain], got, ref):
        assert a.shape == b.shape and torch.equal(a, b), name


def test_run_with_cache_of_captured_sites_builds_no_graph():
    m = traced("llama")
    ids = tokens(1, 5)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_k"]
    req = Request(cache=tuple(names))
    assert isinstance(m.graph(req), TapRun)
    assert not isinstance(m.graph(Request(cache=("blocks.0.attn.hook_pattern",))), TapRun)  # a derived site
    assert not isinstance(m.graph(Request(cache=tuple(names), stop_at_layer=1)), TapRun)
    _, cache = m.run_with_cache(ids, names_filter=names)
    ref = m.specialised(req)(ids, torch.ones_like(ids))
    assert list(cache) == names and all(torch.equal(cache[n], r) for n, r in zip(names, ref[1:]))


def test_threads_tap_their_own_sites():
    m = traced("llama")
    ids = tokens(2, 6)
    sets = [["blocks.0.hook_resid_pre"], ["blocks.1.hook_mlp_out", "ln_final.hook_out"], ["blocks.0.attn.hook_v"]]
    want = {i: dict(m.run_with_cache(ids, names_filter=s)[1]) for i, s in enumerate(sets)}
    errors = []

    def work(i: int) -> None:
        for _ in range(30):
            got = dict(m.run_with_cache(ids, names_filter=sets[i])[1])
            if list(got) != sets[i] or not all(torch.equal(got[k], want[i][k]) for k in got):
                errors.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
