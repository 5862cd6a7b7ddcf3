"""Hook state belongs to the call: threads, nested contexts, hooks added mid-forward, failed registration."""

from __future__ import annotations

import threading

import pytest
import torch

from fxlens.interventions.patches import AddPatch, ZeroPatch
from tests.conftest import tokens, traced

SITE = "blocks.0.hook_resid_post"


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_three_threads_with_different_hooks_each_get_their_own_result():
    m = traced("llama")
    ids = tokens(2, 6)
    v = torch.randn(m.cfg.d_model)
    jobs = {
        "none": lambda: m(ids),
        "zero": lambda: m.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_mlp_out", ZeroPatch())]),
        "patch": lambda: _in_patch(m, ids, v),
    }
    expected = {k: f().detach() for k, f in jobs.items()}
    assert _diff(expected["none"], expected["zero"]) > 1e-3 and _diff(expected["none"], expected["patch"]) > 1e-3
    errors: list[str] = []
    barrier = threading.Barrier(3)

    def worker(key):
        barrier.wait()
        for i in range(100):
            got = jobs[key]()
            if _diff(got, expected[key]) > 1e-6:
                errors.append(f"{key} call {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _in_patch(m, ids, v):
    with m.patch({SITE: AddPatch(vector=v)}):
        return m(ids)


def test_a_thread_does_not_see_another_threads_context():
    m = traced("gpt2")
    ids = tokens(1, 5)
    plain = m(ids)
    inside, seen = threading.Event(), {}
    release = threading.Event()

    def other():
        with m.patch({SITE: ZeroPatch()}):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(5)
    seen["out"] = m(ids)
    release.set()
    t.join()
    assert _diff(seen["out"], plain) == 0


def test_nested_contexts_restore_exactly_the_outer_state():
    m = traced("llama")
    ids = tokens(1, 5)
    calls = []
    with m.hooks(fwd_hooks=[(SITE, lambda x, hook: calls.append("outer"))]):
        with m.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: calls.append("inner"))]):
            m(ids)
        m(ids)  # the outer hook is still there
        with m.patch({"blocks.1.hook_mlp_out": ZeroPatch()}):
            pass
        m(ids)
    m(ids)
    assert calls == ["outer", "inner", "outer", "outer"]


def test_run_with_hooks_inside_a_context_keeps_the_context_hook():
    m = traced("llama")
    ids = tokens(1, 5)
    calls = []
    with m.hooks(fwd_hooks=[(SITE, lambda x, hook: calls.append("ctx"))]):
        m.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: calls.append("tmp"))])
        m(ids)
    assert calls == ["ctx", "tmp", "ctx"]


def test_a_hook_that_opens_and_closes_a_context_mid_forward_keeps_later_hooks():
    m = traced("llama")
    ids = tokens(1, 5)
    calls = []

    def opener(x, hook):
        with m.hooks(fwd_hooks=[]):
            pass
        calls.append("first")

    with m.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", opener), ("blocks.1.hook_resid_post",
                                                                  lambda x, hook: calls.append("later"))]):
        m(ids)
    assert calls == ["first", "later"]


def test_reset_hooks_inside_patch_neither_raises_nor_hides_the_exception():
    m = traced("llama")
    ids = tokens(1, 5)
    with m.patch({SITE: ZeroPatch()}):
        m.reset_hooks()
        assert m.active_hooks() == []
    assert _diff(m(ids), traced("llama").hf_model(input_ids=ids).logits) <= 1e-5
    with pytest.raises(RuntimeError, match="boom"):
        with m.patch({SITE: ZeroPatch()}):
            m.reset_hooks()
            raise RuntimeError("boom")


def test_hook_added_during_a_forward_on_a_later_site_runs_in_that_forward():
    m = traced("llama")
    ids = tokens(1, 5)
    calls = []

    def adder(x, hook):
        m.add_hook("blocks.1.hook_resid_post", lambda y, hook: calls.append("added"))

    with m.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", adder),
                            ("blocks.1.hook_resid_post", lambda y, hook: calls.append("declared"))]):
        m(ids)
    assert calls == ["declared", "added"]
    m.reset_hooks()


def test_hook_added_mid_forward_at_a_site_the_graph_does_not_hook_raises():
    m = traced("llama")
    ids = tokens(1, 5)

    def adder(x, hook):
        m.add_hook("blocks.1.hook_mlp_out", lambda y, hook: None)

    with pytest.raises(RuntimeError, match="during a forward whose graph does not hook"):
        m.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", adder)])
    assert m.active_hooks() == []


def test_a_failed_registration_leaves_no_hook_behind():
    m = traced("llama")
    f = lambda x, hook: None  # noqa: E731
    with pytest.raises(KeyError, match="closest"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[(SITE, f), ("blocks.0.hook_resid_postt", f)], reset_hooks_end=False)
    assert m.active_hooks() == []
    with pytest.raises(TypeError, match="callable"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[(SITE, f), (SITE, "not a function")])
    assert m.active_hooks() == []


def test_permanent_hooks_survive_reset_unless_asked():
    m = traced("gpt2")
    ids = tokens(1, 4)
    calls = []
    m.add_perma_hook(SITE, lambda x, hook: calls.append("perm"))
    m.add_hook(SITE, lambda x, hook: calls.append("temp"))
    m(ids)
    m.reset_hooks()
    m(ids)
    m.reset_hooks(including_permanent=True)
    m(ids)
    assert calls == ["perm", "temp", "perm"]


def test_prepend_runs_first_and_ctx_is_cleared_by_reset():
    m = traced("gpt2")
    calls = []

    def a(x, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1
        calls.append("a")

    m.add_hook(SITE, a)
    m.add_hook(SITE, lambda x, hook: calls.append("b"), prepend=True)
    m(tokens(1, 4))
    m(tokens(1, 4))
    assert calls == ["b", "a", "b", "a"] and m.hook_dict[SITE].ctx["n"] == 2
    m.reset_hooks()
    assert m.hook_dict[SITE].ctx == {}


def test_reset_hooks_end_false_keeps_hooks_until_reset():
    m = traced("gpt2")
    calls = []
    m.run_with_hooks(tokens(1, 4), fwd_hooks=[(SITE, lambda x, hook: calls.append(1))], reset_hooks_end=False)
    m(tokens(1, 4))
    m.reset_hooks()
    m(tokens(1, 4))
    assert calls == [1, 1]


def test_in_place_edit_at_mlp_in_changes_only_what_returning_it_would():
    m = traced("llama")
    ids = tokens(1, 6)

    def halve_in_place(x, hook):
        x.mul_(0.5)

    def halve_return(x, hook):
        return x * 0.5

    names = ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"]
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", halve_in_place)]):
        a, ca = m.run_with_cache(ids, names_filter=names)
    with m.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", halve_return)]):
        b, cb = m.run_with_cache(ids, names_filter=names)
    _, plain = m.run_with_cache(ids, names_filter=names)
    assert _diff(a, b) == 0
    assert _diff(ca["blocks.0.hook_resid_mid"], plain["blocks.0.hook_resid_mid"]) == 0
    assert _diff(ca["blocks.0.hook_resid_post"], cb["blocks.0.hook_resid_post"]) == 0


def test_cached_values_are_detached_and_grad_mode_is_the_callers():
    m = traced("llama")
    ids = tokens(1, 5)
    with torch.no_grad():
        assert not m(ids).requires_grad
    out, cache = m.run_with_cache(ids, names_filter=SITE)
    assert out.requires_grad and not cache[SITE].requires_grad
