"""Graphs built per hook signature do not accumulate: the LRU releases their generated source too."""

from __future__ import annotations

import random

import pytest
import torch
from torch.fx import graph_module

import fxlens
from tests.conftest import tiny_hf, tokens


def _sweep_signatures(m, n: int, seed: int = 0) -> None:
    rng, ids = random.Random(seed), tokens(1, 4)
    with torch.no_grad():
        for _ in range(n):
            m.run_with_cache(ids, names_filter=rng.sample(m.hook_names, 3))


def test_generated_sources_stay_bounded_by_the_graph_lru():
    m = fxlens.trace(tiny_hf("llama"), graph_cache=False)
    _sweep_signatures(m, 40)
    before = len(graph_module._loader.eval_cache)
    _sweep_signatures(m, 120, seed=1)
    assert len(graph_module._loader.eval_cache) - before <= 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_thousands_of_filter_sets_keep_rss_flat():
    m = fxlens.trace(tiny_hf("llama"), graph_cache=False)
    _sweep_signatures(m, 300)
    base = _rss_mib()
    _sweep_signatures(m, 2000, seed=1)
    assert _rss_mib() - base <= 50
