"""The on-disk graph cache gives the same graph, sites and outputs as a fresh capture."""

from __future__ import annotations

import pytest
import torch

import fxlens
from tests.conftest import tiny_hf, tokens


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_cached_graph_matches_fresh_capture(family, tmp_path, monkeypatch):
    monkeypatch.setenv("FXLENS_CACHE", str(tmp_path))
    hf = tiny_hf(family)
    first = fxlens.trace(hf)
    second = fxlens.trace(hf)
    assert not first.graph_from_cache and second.graph_from_cache
    assert list(tmp_path.glob("graphs/*.pkl"))
    assert second.sites == first.sites and second.cfg == first.cfg
    ids = tokens(2, 6)
    assert torch.equal(second(ids), first(ids))
    split = [n for n in second.all_hook_names if n not in second.hook_names]
    for names in (second.hook_names, split):
        _, c1 = first.run_with_cache(ids, names_filter=names)
        _, c2 = second.run_with_cache(ids, names_filter=names)
        assert list(c1) == list(c2) == names
        for k in names:
            assert torch.equal(c1[k], c2[k]), k
    # different weights, same structure: the cached graph reads the new model's parameters
    other = tiny_hf(family, seed=5)
    third = fxlens.trace(other)
    assert third.graph_from_cache
    out = other(input_ids=ids, attention_mask=torch.ones_like(ids))
    ref = out.logits if third.output_kind == "logits" else out.last_hidden_state
    assert (third(ids) - ref).abs().max().item() <= 1e-5


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("FXLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("FXLENS_GRAPH_CACHE", "0")
    fxlens.trace(tiny_hf("gpt2"))
    assert not list(tmp_path.glob("graphs/*"))
