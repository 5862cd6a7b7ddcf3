"""``fxlens.hook_points``: TransformerLens' toy ``HookedRootModule`` example runs unchanged, with the
hook semantics of traced models (checked names, nesting contexts, per-thread hooks, gradients)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import fxlens
from fxlens.hook_points import HookedRootModule, HookPoint
from tests.conftest import traced


class SquareThenAdd(nn.Module):  # the seed Main Demo's cell [55], verbatim but for the import
    def __init__(self, offset):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(offset))
        self.hook_square = HookPoint()

    def forward(self, x):
        square = self.hook_square(x * x)
        return self.offset + square


class TwoLayerModel(HookedRootModule):
    def __init__(self):
        super().__init__()
        self.layer1 = SquareThenAdd(3.0)
        self.layer2 = SquareThenAdd(-4.0)
        self.hook_in = HookPoint()
        self.hook_mid = HookPoint()
        self.hook_out = HookPoint()
        super().setup()

    def forward(self, x):
        x_in = self.hook_in(x)
        x_mid = self.hook_mid(self.layer1(x_in))
        x_out = self.hook_out(self.layer2(x_mid))
        return x_out


def test_seed_demo_cache_and_intervention_print_tls_values():
    model = TwoLayerModel()
    out, cache = model.run_with_cache(torch.tensor(5.0))
    # the seed's printed output: 780.0; hook_in 5, layer1.hook_square 25, hook_mid 28, layer2.hook_square 784
    assert out.item() == 780.0
    assert {k: v.item() for k, v in cache.items()} == {
        "hook_in": 5.0, "layer1.hook_square": 25.0, "hook_mid": 28.0, "layer2.hook_square": 784.0, "hook_out": 780.0}
    assert list(cache) == ["hook_in", "layer1.hook_square", "hook_mid", "layer2.hook_square", "hook_out"]
    seen = []

    def set_to_zero_hook(tensor, hook):
        seen.append(hook.name)
        return torch.tensor(0.0)

    assert model.run_with_hooks(torch.tensor(5.0), fwd_hooks=[("layer2.hook_square", set_to_zero_hook)]).item() == -4.0
    assert seen == ["layer2.hook_square"] and model(torch.tensor(5.0)).item() == 780.0  # removed after the run


def test_isinstance_and_hook_dict():
    model = TwoLayerModel()
    assert isinstance(model, fxlens.HookedRootModule) and isinstance(model.hook_in, fxlens.HookPoint)
    assert isinstance(traced("gpt2"), HookedRootModule) and not isinstance(traced("gpt2"), TwoLayerModel)
    assert list(model.hook_dict) == ["layer1.hook_square", "layer2.hook_square", "hook_in", "hook_mid", "hook_out"]
    assert model.hook_dict["hook_mid"] is model.hook_mid and model.mod_dict["layer1"] is model.layer1
    assert model.layer1.hook_square.name == "layer1.hook_square"


def test_typo_in_a_hook_list_registers_nothing_and_names_the_sites():
    model = TwoLayerModel()
    with pytest.raises(KeyError, match="unknown hook point 'hook_mdi'.*'hook_mid'"):
        model.run_with_hooks(torch.tensor(5.0), fwd_hooks=[("hook_in", lambda x, hook: x * 0),
                                                           ("hook_mdi", lambda x, hook: x)], reset_hooks_end=False)
    assert model(torch.tensor(5.0)).item() == 780.0


def test_contexts_nest_and_permanent_hooks_survive_reset():
    model = TwoLayerModel()

    def double(x, hook):
        return x * 2

    model.add_perma_hook("hook_out", lambda x, hook: x + 1)
    with model.hooks(fwd_hooks=[("hook_in", double)]):           # x_in = 10 -> 10^4 + ... = ((100+3)^2 - 4)
        with model.hooks(fwd_hooks=[("hook_mid", double)]):      # x_mid = 2 * 103
            assert model(torch.tensor(5.0)).item() == (206 ** 2 - 4) + 1
        assert model(torch.tensor(5.0)).item() == (103 ** 2 - 4) + 1   # only the inner hook left
    model.reset_hooks()
    assert model(torch.tensor(5.0)).item() == 781.0
    model.reset_hooks(including_permanent=True)
    assert model(torch.tensor(5.0)).item() == 780.0


def test_hook_added_during_the_forward_runs_in_that_forward():
    model = TwoLayerModel()

    def add_later(x, hook):
        model.add_hook("hook_out", lambda y, hook: y * 0)

    assert model.run_with_hooks(torch.tensor(5.0), fwd_hooks=[("hook_in", add_later)]).item() == 0.0
    model.reset_hooks()


def test_backward_hooks_and_incl_bwd_match_autograd():
    model = TwoLayerModel()
    x = torch.tensor(5.0, requires_grad=True)
    out, cache = model.run_with_cache(x, incl_bwd=True)
    # out = (x_mid^2 - 4), x_mid = x^2 + 3: d out / d x_mid = 2 * 28, d out / d x = 2 * 28 * 2 * 5
    assert cache["hook_mid_grad"].item() == 56.0 and cache["hook_in_grad"].item() == 560.0
    assert cache["hook_out_grad"].item() == 1.0 and x.grad.item() == 560.0
    x.grad = None
    with model.hooks(bwd_hooks=[("hook_mid", lambda g, hook: g * 0)]):
        model(x).backward()
    assert x.grad.item() == 0.0


def test_threads_do_not_see_each_others_temporary_hooks():
    model = TwoLayerModel()
    results: dict[str, list[float]] = {"hooked": [], "plain": []}
    barrier = threading.Barrier(2)

    def hooked():
        with model.hooks(fwd_hooks=[("hook_mid", lambda x, hook: x * 0)]):
            barrier.wait()
            results["hooked"] += [model(torch.tensor(5.0)).item() for _ in range(50)]

    def plain():
        barrier.wait()
        results["plain"] += [model(torch.tensor(5.0)).item() for _ in range(50)]

    threads = [threading.Thread(target=hooked), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"hooked": [-4.0] * 50, "plain": [780.0] * 50}
