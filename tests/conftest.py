"""Tiny random models of every family the core claims, traced once per session."""

from __future__ import annotations

import pytest
import torch
import transformers

import fxlens

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64)

#: family id -> (model_type, config kwargs). Every family the core issue lists.
CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("llama", _LLAMA_LIKE),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "gemma": ("gemma", dict(_LLAMA_LIKE, head_dim=8)),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, head_dim=8)),
    "gemma3": ("gemma3_text", dict(_LLAMA_LIKE, head_dim=8)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, rotary_pct=0.5)),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                        max_position_embeddings=64, word_embed_proj_dim=32)),
    "phi3": ("phi3", _LLAMA_LIKE),
    "bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64)),
    # model types the Llama / BERT rules also cover
    "mistral": ("mistral", _LLAMA_LIKE),
    "qwen3": ("qwen3", _LLAMA_LIKE),
    "olmo": ("olmo", _LLAMA_LIKE),
    "roberta": ("roberta", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=70)),
}
FAMILIES = list(CONFIGS)


def tiny_hf(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random HF model of ``family`` in eval mode (fp32, CPU)."""
    model_type, kw = CONFIGS[family]
    cfg = transformers.AutoConfig.for_model(model_type, **_COMMON, **kw)
    torch.manual_seed(seed)
    auto = transformers.AutoModel if family in ("bert", "roberta") else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg)
    # Random init leaves some norms at identity; perturb every parameter so sites differ.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


_TRACED: dict[str, fxlens.HookedModel] = {}


def traced(family: str) -> fxlens.HookedModel:
    """The session's traced tiny model of ``family``."""
    if family not in _TRACED:
        _TRACED[family] = fxlens.trace(tiny_hf(family), graph_cache=False)  # always exercise capture
    return _TRACED[family]


def tokens(batch: int = 2, pos: int = 7, seed: int = 1) -> torch.Tensor:
    """Random token ids that avoid the special ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, pos), generator=g)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
