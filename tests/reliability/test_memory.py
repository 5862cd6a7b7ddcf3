"""Graphs built per hook signature do not accumulate: 10,000 distinct filter sets keep RSS flat.

Cache-only requests of sites the captured graph holds run through one shared tap graph (no graph
built per signature); every other signature gets a specialised graph whose generated source the
LRU releases when it drops the graph.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import transformers
from torch.fx import graph_module

import fxlens
from fxlens.tracer.specialise import Request
from fxlens.tracer.taps import TapRun
from tests.conftest import _COMMON, _LLAMA_LIKE, tiny_hf, tokens


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared 2-core machine: intra-op threads only contend (38 ms vs 3 ms a forward)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _distinct_sets(names: list[str], n: int, seed: int, size: tuple[int, int] = (1, 6)) -> list[list[str]]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        pick = frozenset(rng.sample(names, rng.randint(*size)))
        if pick not in seen:
            seen.add(pick)
            out.append(sorted(pick, key=names.index))
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _sources() -> int:
    return len(graph_module._loader.eval_cache)


def _one_layer_llama() -> fxlens.HookedModel:
    cfg = transformers.AutoConfig.for_model("llama", **{**_COMMON, **_LLAMA_LIKE, "num_hidden_layers": 1})
    torch.manual_seed(0)
    return fxlens.trace(transformers.AutoModelForCausalLM.from_config(cfg).eval(), graph_cache=False)


def test_ten_thousand_filter_sets_keep_rss_flat():
    m = _one_layer_llama()  # 21 captured sites: 10,000 distinct sets of 1-6 of them in ~2.5 ms each
    plain = [n for n in m.hook_names if m.sites[n].derive is None]
    sets = _distinct_sets(plain, 10_300, seed=0)
    ids = tokens(1, 4)
    with _one_thread(), torch.no_grad():
        ref = dict(zip(plain, m.specialised(Request(cache=tuple(plain)))(ids, torch.ones_like(ids))[1:]))
        for names in sets[:300]:  # warm-up
            m.run_with_cache(ids, names_filter=names)
        rss, sources, t0 = _rss_mib(), _sources(), time.perf_counter()
        for names in sets[300:]:
            _, cache = m.run_with_cache(ids, names_filter=names)
        seconds = time.perf_counter() - t0
    assert list(cache) == names and all(torch.equal(cache[n], ref[n]) for n in names)
    assert _sources() - sources <= 1, "a graph was generated per signature"
    taps = m.graph(Request(cache=(plain[0],))).graph  # this model's tap graph
    assert sum(isinstance(o, TapRun) and o.graph is taps for o in gc.get_objects()) <= 32, \
        "the graph LRU keeps every signature"
    assert _rss_mib() - rss <= 50, f"RSS grew {_rss_mib() - rss:.1f} MiB over 10,000 filter sets ({seconds:.0f} s)"


def test_specialised_sources_stay_bounded_by_the_graph_lru():
    m = fxlens.trace(tiny_hf("llama"), graph_cache=False)
    ids = tokens(1, 4)
    hook_sets = _distinct_sets(m.hook_names, 160, seed=1, size=(2, 3))
    with _one_thread(), torch.no_grad():
        for names in hook_sets[:40]:
            m.run_with_hooks(ids, fwd_hooks=[(n, lambda x, hook: x) for n in names])
        before = _sources()
        for names in hook_sets[40:]:
            m.run_with_hooks(ids, fwd_hooks=[(n, lambda x, hook: x) for n in names])
    assert _sources() - before <= 2


@pytest.mark.slow
def test_ten_thousand_specialised_signatures_keep_rss_flat():
    """Every set holds a derived site (attention internals, norm scales): 10,000 specialised graphs."""
    m = fxlens.trace(tiny_hf("llama"), graph_cache=False)
    derived = [n for n in m.hook_names if m.sites[n].derive is not None]
    sets = [sorted({d, *s}, key=m.hook_names.index)
            for d, s in zip(random.Random(2).choices(derived, k=10_300), _distinct_sets(m.hook_names, 10_300, 3))]
    ids = tokens(1, 4)
    with _one_thread(), torch.no_grad():
        for names in sets[:300]:
            m.run_with_cache(ids, names_filter=names)
        rss, sources = _rss_mib(), _sources()
        for names in sets[300:]:
            m.run_with_cache(ids, names_filter=names)
    assert _sources() - sources <= 2
    assert _rss_mib() - rss <= 50
