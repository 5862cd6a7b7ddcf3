"""``model.cfg``: the dimensions and kinds TransformerLens users read."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .tracer.dims import hf_dims  # noqa: F401 - re-exported


@dataclass
class ModelConfig:
    """TransformerLens-style configuration read from the HF config and the graph.

    ``n_kv_heads`` (TL: ``n_key_value_heads``) is smaller than ``n_heads`` under grouped-query
    attention; K/V sites then have ``n_kv_heads`` heads. Field names follow TransformerLens'
    ``HookedTransformerConfig`` where the concept is the same.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int | None
    family: str
    model_type: str
    normalization_type: str
    positional_embedding_type: str
    act_fn: str | None
    parallel_attn_mlp: bool
    dtype: torch.dtype
    device: str
    model_name: str = ""
    eps: float | None = None
    rotary_dim: int | None = None
    original_architecture: str | None = None
    default_prepend_bos: bool | None = None
    tokenizer_prepends_bos: bool | None = None
    attn_only: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False

    @property
    def n_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    def to_dict(self) -> dict:
        """Plain-dict form (for JSON): the dtype as its name."""
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        return d
