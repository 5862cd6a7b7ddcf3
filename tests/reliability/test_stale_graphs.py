"""A graph never computes yesterday's model: every change to the HF model after tracing is detected."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxlens
from tests.conftest import tiny_hf, tokens


def _fresh(family: str = "llama", dtype: torch.dtype = torch.float32) -> fxlens.HookedModel:
    return fxlens.trace(tiny_hf(family).to(dtype), graph_cache=False)


def _hf_logits(m, ids) -> torch.Tensor:
    with torch.no_grad():
        return m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _err(m, ids) -> float:
    with torch.no_grad():
        return (m(ids).float() - _hf_logits(m, ids).float()).abs().max().item()


def _changed(m, ids, change) -> None:
    before = _hf_logits(m, ids)
    change(m.hf_model)
    assert (_hf_logits(m, ids) - before).abs().max().item() > 1e-3  # the change matters
    assert _err(m, ids) <= 1e-5


def test_replaced_parameter_is_rebound():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)

    def change(hf):
        lin = hf.model.layers[0].mlp.down_proj
        lin.weight = nn.Parameter(torch.randn_like(lin.weight))
    _changed(m, ids, change)


def test_load_state_dict_assign_is_rebound():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)
    other = tiny_hf("llama", seed=5).state_dict()
    _changed(m, ids, lambda hf: hf.load_state_dict(other, assign=True))


def test_retied_lm_head_is_rebound():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)

    def change(hf):
        hf.lm_head.weight = hf.model.embed_tokens.weight
    _changed(m, ids, change)


def test_resized_embeddings_are_recaptured():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)
    m.hf_model.resize_token_embeddings(m.cfg.d_vocab + 8)
    assert _err(m, ids) <= 1e-5
    assert m(ids).shape[-1] == m.cfg.d_vocab == 136


def test_changed_norm_epsilon_is_recaptured():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)

    def change(hf):
        hf.model.layers[0].input_layernorm.variance_epsilon = 3.0
    _changed(m, ids, change)


class _LoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def test_injected_adapter_is_recaptured():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)

    def change(hf):
        attn = hf.model.layers[1].self_attn
        attn.q_proj = _LoRA(attn.q_proj)
    _changed(m, ids, change)


def test_in_place_edits_keep_the_graph():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)
    graph = m.base_graph
    _changed(m, ids, lambda hf: hf.model.layers[0].mlp.up_proj.weight.data.mul_(3.0))
    assert m.base_graph is graph


def test_bf16_captured_model_moved_to_fp32_equals_hf():
    m, ids = _fresh(dtype=torch.bfloat16), tokens(2, 6)
    m(ids)
    m.float()
    assert m.cfg.dtype == torch.float32
    assert _err(m, ids) <= 1e-5


def test_fp32_model_moved_to_bf16_runs_and_equals_hf():
    m, ids = _fresh(), tokens(2, 6)
    m(ids)
    m.to(torch.bfloat16)
    assert m.cfg.dtype == torch.bfloat16 and m(ids).dtype == torch.bfloat16
    assert _err(m, ids) == 0.0


def test_training_mode_is_refused():
    m, ids = _fresh(), tokens(2, 6)
    m.hf_model.train()
    with pytest.raises(RuntimeError, match="training mode.*eval"):
        m(ids)


def test_parameter_written_into_the_module_dict_is_rebound():
    """The per-call check reads the modules' own tensor dicts: a write that bypasses setattr is seen."""
    m, ids = _fresh(), tokens(2, 6)
    m(ids)

    def change(hf):
        lin = hf.model.layers[0].self_attn.o_proj
        vars(lin)["_parameters"]["weight"] = nn.Parameter(torch.randn_like(lin.weight))
    _changed(m, ids, change)


def test_dtype_move_outside_fxlens_is_recaptured():
    """``hf_model.to(dtype)`` rewrites ``param.data`` in place (same Parameter objects): still detected."""
    m, ids = _fresh(), tokens(2, 6)
    m(ids)
    m.hf_model.to(torch.bfloat16)
    assert m(ids).dtype == torch.bfloat16
    assert _err(m, ids) <= 1e-5
