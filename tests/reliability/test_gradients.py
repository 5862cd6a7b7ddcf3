"""Gradients through hooked runs, backward hooks and ``incl_bwd`` caches, checked against HF autograd."""

from __future__ import annotations

import torch

import fxlens
from tests.conftest import tiny_hf, tokens

SITE = "blocks.0.hook_resid_post"


def _model() -> fxlens.HookedModel:
    return fxlens.trace(tiny_hf("llama"), graph_cache=False)


def _hf_resid_grad(m, ids, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d loss / d resid_post 0, d loss / d embed weight)`` by plain autograd on the HF model."""
    hf = m.hf_model
    hf.zero_grad()
    seen = {}

    def keep(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h.retain_grad()
        if zero:
            h.register_hook(lambda g: torch.zeros_like(g))
        seen["h"] = h

    handle = hf.model.layers[0].register_forward_hook(keep)
    try:
        loss = hf(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
    finally:
        handle.remove()
    grad_w = hf.model.embed_tokens.weight.grad.clone()
    hf.zero_grad()
    return seen["h"].grad, grad_w


def test_incl_bwd_caches_the_gradient_of_each_site():
    m, ids = _model(), tokens(2, 6)
    ref, _ = _hf_resid_grad(m, ids)
    loss, cache = m.run_with_cache(ids, names_filter=[SITE, "blocks.1.hook_mlp_out"], return_type="loss",
                                   incl_bwd=True)
    assert set(cache) == {SITE, "blocks.1.hook_mlp_out", SITE + "_grad", "blocks.1.hook_mlp_out_grad"}
    torch.testing.assert_close(cache[SITE + "_grad"], ref, atol=1e-6, rtol=1e-5)


def test_gradient_flows_through_a_hooked_run_to_the_parameters():
    m, ids = _model(), tokens(2, 6)
    _, ref_w = _hf_resid_grad(m, ids)
    m.hf_model.zero_grad()
    loss = m.run_with_hooks(ids, fwd_hooks=[(SITE, lambda x, hook: x * 1.0)], return_type="loss")
    loss.backward()
    torch.testing.assert_close(m.hf_model.model.embed_tokens.weight.grad, ref_w, atol=1e-6, rtol=1e-5)


def test_backward_hook_sees_and_can_replace_the_gradient():
    m, ids = _model(), tokens(2, 6)
    ref, _ = _hf_resid_grad(m, ids)
    _, ref_zeroed_w = _hf_resid_grad(m, ids, zero=True)
    seen = []

    def zero(grad, hook):
        seen.append(grad.clone())
        return torch.zeros_like(grad)

    m.hf_model.zero_grad()
    loss = m.run_with_hooks(ids, bwd_hooks=[(SITE, zero)], return_type="loss")
    loss.backward()  # the hook was registered during the forward: it fires after the context closed
    torch.testing.assert_close(seen[0], ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m.hf_model.model.embed_tokens.weight.grad, ref_zeroed_w, atol=1e-6, rtol=1e-5)
    assert ref_zeroed_w.abs().max() == 0 < _hf_resid_grad(m, ids)[1].abs().max()  # the hook mattered


def test_no_grad_callers_build_no_graph():
    m, ids = _model(), tokens(1, 4)
    with torch.no_grad():
        out = m.run_with_hooks(ids, bwd_hooks=[(SITE, lambda g, hook: None)])
    assert not out.requires_grad
