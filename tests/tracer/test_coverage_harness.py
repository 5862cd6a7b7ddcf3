"""The coverage harness builds valid tiny configs and reports site values, not just outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import coverage  # noqa: E402
from tiny_configs import N_LAYERS, tiny_config  # noqa: E402

#: families whose tiny config failed a validator before (layer_types length, kv-head rules, sub-configs)
VALIDATED = ["zamba", "zamba2", "gemma4_assistant", "dots3_note", "mamba2", "gpt_neo", "cohere_compass_text",
             "gemma3n_text", "lfm2_moe", "zaya", "dbrx", "musicgen"]


@pytest.mark.parametrize("model_type", VALIDATED)
def test_tiny_config_passes_the_config_validators(model_type):
    cfg = tiny_config(model_type)
    text = getattr(cfg, "text_config", None) or getattr(cfg, "decoder", None) or cfg
    for key in ("layer_types", "layers_block_type", "attention_layers"):
        kinds = getattr(text, key, None)
        if isinstance(kinds, list):
            assert len(kinds) == getattr(text, "num_hidden_layers", None) or len(kinds) == N_LAYERS, key


def test_mla_tiny_config_gives_every_head_its_keys():
    """MLA repeats no keys: a config claiming fewer KV heads than heads breaks HF's own forward."""
    cfg = tiny_config("deepseek_v3")
    assert cfg.num_key_value_heads == cfg.num_attention_heads and cfg.head_dim == cfg.qk_rope_head_dim


def test_a_row_is_green_only_with_correct_site_values():
    row = coverage.check_one("granite")  # embedding x3, residual x0.5: W_O lacks the multiplier
    assert row["sites"] and row["fidelity"] <= 1e-5 and row["capture_s"] > 0
    assert row["values_ok"] is False and "heads" in row["values"] and not coverage.green(row)
    assert row["errors"]["embed"] <= 1e-4 and row["errors"]["decompose"] <= 1e-4
