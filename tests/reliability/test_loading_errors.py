"""Model paths and model kinds fxlens cannot load: refused before capture, saying why and what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

import fxlens
from fxlens.support import UnsupportedModelError, unsupported_reason
from tests.conftest import FAMILIES, tiny_hf, tokens

SSM = "unsupported: state-space layers have no attention sites"
_TINY = {
    "mamba": (dict(hidden_size=16, num_hidden_layers=1, state_size=4, vocab_size=32),
              transformers.AutoModelForCausalLM),
    "mamba2": (dict(hidden_size=32, num_hidden_layers=1, state_size=4, num_heads=4, head_dim=16, n_groups=1,
                    vocab_size=32, expand=2), transformers.AutoModelForCausalLM),
    "rwkv": (dict(hidden_size=16, num_hidden_layers=2, attention_hidden_size=16, intermediate_size=32, vocab_size=32),
             transformers.AutoModelForCausalLM),
    "jamba": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, vocab_size=32, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4),
              transformers.AutoModelForCausalLM),
    "t5": (dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=32),
           transformers.AutoModelForSeq2SeqLM),
    "bart": (dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=32), transformers.AutoModelForSeq2SeqLM),
}


def _tiny(model_type: str):
    kw, auto = _TINY[model_type]
    return auto.from_config(transformers.AutoConfig.for_model(model_type, **kw)).eval()


@pytest.mark.parametrize(("model_type", "words"), [
    ("mamba", f"{SSM} (mamba: its MambaMixer layers are recurrences"),
    ("mamba2", f"{SSM} (mamba2: its Mamba2Mixer layers"),
    ("rwkv", f"{SSM} (rwkv: its RwkvSelfAttention layers"),
    ("jamba", f"{SSM} (jamba: hybrid model: its JambaMambaMixer layers"),
    ("t5", "unsupported: encoder-decoder models (t5) have two stacks"),
    ("bart", "unsupported: encoder-decoder models (bart)"),
])
def test_trace_refuses_unsupported_models(model_type, words):
    with pytest.raises(UnsupportedModelError, match="unsupported: ") as e:
        fxlens.trace(_tiny(model_type), graph_cache=False)
    assert words in str(e.value)


@pytest.mark.parametrize("model_type", ["mamba", "t5"])
def test_from_pretrained_refuses_before_loading(model_type, tmp_path):
    _tiny(model_type).save_pretrained(tmp_path / model_type)
    with pytest.raises(UnsupportedModelError, match="unsupported: (state-space|encoder-decoder)"):
        fxlens.from_pretrained(tmp_path / model_type)


@pytest.mark.parametrize("family", FAMILIES)
def test_supported_families_have_no_reason(family):
    assert unsupported_reason(tiny_hf(family)) is None


@pytest.mark.parametrize("path", ["/nonexistent/model", "./no-such-model", "models/a/b"])
def test_missing_folder_is_no_such_folder(path):
    with pytest.raises(FileNotFoundError, match=f"no such folder: {path} \\(give an existing model folder"):
        fxlens.from_pretrained(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json: it is not an HF model folder"):
        fxlens.from_pretrained(tmp_path)


def test_plain_file_is_not_a_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="weights.bin is a file, not a model folder"):
        fxlens.from_pretrained(tmp_path / "weights.bin")


def _relayered(tmp_path, family: str, n_layers: int):
    """A saved tiny ``family`` checkpoint (2 layers of weights) whose config.json says ``n_layers``."""
    src = tmp_path / "src"
    tiny_hf(family).save_pretrained(src)
    dst = tmp_path / f"{family}{n_layers}"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = n_layers
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(("family", "n_layers", "words"), [
    ("llama", 3, "does not match its config (3 layers in config.json): 9 weights missing from the checkpoint "
                 "(would be random; layers [2]"),
    ("llama", 1, "does not match its config (1 layers in config.json): 9 checkpoint weights the config has no "
                 "place for (would be dropped; layers [1]"),
    ("gpt2", 1, "(would be dropped; layers [1], e.g. transformer.h.1."),
    ("bert", 3, "(would be random; layers [2], e.g. encoder.layer.2."),
])
def test_layer_count_differs_from_weights(tmp_path, family, n_layers, words):
    path = _relayered(tmp_path, family, n_layers)
    with pytest.raises(ValueError, match=f"checkpoint {path} does not match its config") as e:
        fxlens.from_pretrained(path)
    assert words in str(e.value) and "Fix the layer count (num_hidden_layers) in config.json" in str(e.value)


def test_matching_checkpoint_loads_with_hf_logits(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="no tokenizer files"):
        m = fxlens.from_pretrained(tmp_path / "m")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(m(ids), hf(ids).logits)


def test_weight_missing_outside_the_layers(tmp_path):
    """An untied lm_head absent from the file would be random: refused, naming it."""
    from safetensors.torch import load_file, save_file

    hf = tiny_hf("llama")
    assert not hf.config.tie_word_embeddings
    hf.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 weights missing from the checkpoint \(would be random; e.g. lm_head"):
        fxlens.from_pretrained(tmp_path / "m")
