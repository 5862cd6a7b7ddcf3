"""Gemma 1/2/3 (text): scaled embeddings; Gemma 2/3 add post-norms around attention and MLP."""

from .base import llama_like

GEMMA = llama_like("gemma", "gemma")
GEMMA2 = llama_like(
    "gemma2", "gemma2", "gemma3_text",
    ln2="pre_feedforward_layernorm",
    attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)
