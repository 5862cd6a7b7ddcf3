"""Model dimensions from an HF config (the tracer and the loader share them)."""

from __future__ import annotations


def hf_dims(config) -> tuple[int, int, int, int, int]:
    """``(n_layers, d_model, n_heads, n_kv_heads, d_head)`` from an HF config.

    The head counts are the config's claim; ``trace`` prefers what the captured graph shows
    (``chains.graph_heads``) and uses these only where the graph has no attention op.
    Families without attention heads (state-space models) get ``n_heads = 0``.
    """
    if not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(f"unsupported: {type(config).__name__} has no single num_hidden_layers (a model of several "
                         "stacks, e.g. BLT's byte encoder / global / decoder); fxlens instruments one block stack")
    n_layers = config.num_hidden_layers
    d_model = config.hidden_size
    n_heads = getattr(config, "num_attention_heads", None) or 0
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None)
    d_head = head_dim if isinstance(head_dim, int) else (d_model // n_heads if n_heads else 0)
    return n_layers, d_model, n_heads, n_kv, d_head
