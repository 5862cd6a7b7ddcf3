"""Capture by block: a two-block export repeated per layer equals the full export, node for node and
site for site, and is refused (with the reason) where blocks differ."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens
from fxlens.tracer.capture import capture
from tests.conftest import _COMMON, CONFIGS, tokens


def _deep(family: str, n: int = 7) -> torch.nn.Module:
    model_type, kw = CONFIGS[family]
    layers = {k: n for k in ("num_hidden_layers", "n_layer") if k in kw}
    cfg = transformers.AutoConfig.for_model(model_type, **{**_COMMON, **kw, **layers})
    torch.manual_seed(0)
    auto = transformers.AutoModel if family in ("bert", "roberta") else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_by_block_graph_equals_the_full_export_site_for_site(monkeypatch):
    for family in ("llama", "gpt2"):
        hf = _deep(family)
        by_block, full = capture(hf), capture(hf, by_block=False)
        assert by_block.how.startswith("by block: 2 of 7 blocks exported"), by_block.how
        assert full.how == "full export"
        assert len(by_block.gm.graph.nodes) == len(full.gm.graph.nodes)
        ids = tokens(2, 6)
        with torch.no_grad():
            assert torch.equal(by_block.gm(ids, torch.ones_like(ids)), hf(input_ids=ids).logits)
        m = fxlens.trace(hf, graph_cache=False)
        assert m.capture_how.startswith("by block")
        monkeypatch.setenv("FXLENS_BY_BLOCK", "0")
        ref = fxlens.trace(hf, graph_cache=False)
        monkeypatch.delenv("FXLENS_BY_BLOCK")
        assert ref.capture_how == "full export" and m.hook_names == ref.hook_names
        _, cache = m.run_with_cache(ids)
        _, ref_cache = ref.run_with_cache(ids)
        for name in ref.hook_names:  # every repeated block's sites were found and hold that block's values
            assert torch.equal(cache[name], ref_cache[name]), (family, name)
        with torch.no_grad():
            hs = hf(input_ids=ids, output_hidden_states=True).hidden_states
        for L in range(7):
            torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_pre"], hs[L], atol=1e-5, rtol=1e-5)


def test_blocks_that_differ_are_exported_whole_with_the_reason():
    hf = _deep("llama")
    hf.model.layers[4].self_attn.scaling = 0.5  # one block's scalar differs: a repeated block 1 would bake 1/sqrt(d)
    cap = capture(hf)
    assert cap.how.startswith("full export (the blocks do not repeat with a period dividing the depth"), cap.how
    ids = tokens(2, 6)
    with torch.no_grad():
        assert torch.equal(cap.gm(ids, torch.ones_like(ids)), hf(input_ids=ids).logits)


def test_alternating_layer_types_repeat_by_period(monkeypatch):
    hf = _deep("gemma2", n=6)  # sliding, full, sliding, full, ...: period 2
    cap = capture(hf)
    assert cap.how.startswith("by block: 4 of 6 blocks exported, blocks 2..3 (period 2) repeated"), cap.how
    ids = tokens(2, 6)
    with torch.no_grad():
        assert torch.equal(cap.gm(ids, torch.ones_like(ids)), hf(input_ids=ids).logits)
    m = fxlens.trace(hf, graph_cache=False)
    monkeypatch.setenv("FXLENS_BY_BLOCK", "0")
    ref = fxlens.trace(hf, graph_cache=False)
    _, cache = m.run_with_cache(ids)
    _, ref_cache = ref.run_with_cache(ids)
    assert m.hook_names == ref.hook_names
    assert all(torch.equal(cache[n], ref_cache[n]) for n in ref.hook_names)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_core_family_by_block_equals_full_export(family, monkeypatch):
    """Six-layer models of every core family: by block where the blocks allow (else the reason), and
    every site holds exactly the full export's value."""
    hf = _deep(family, n=6)
    m = fxlens.trace(hf, graph_cache=False)
    monkeypatch.setenv("FXLENS_BY_BLOCK", "0")
    ref = fxlens.trace(hf, graph_cache=False)
    assert m.hook_names == ref.hook_names
    ids = tokens(2, 6)
    _, cache = m.run_with_cache(ids)
    _, ref_cache = ref.run_with_cache(ids)
    for name in ref.hook_names:
        assert torch.equal(cache[name], ref_cache[name]), (family, m.capture_how, name)
    if family != "gemma3":  # gemma3's sliding pattern has period 6: six layers are one period
        assert m.capture_how.startswith("by block"), m.capture_how
