"""Llama and the families that share its layout exactly (SmolLM2, Mistral, Qwen2/3, OLMo)."""

from .base import llama_like

LLAMA = llama_like("llama", "llama", "mistral", "qwen2", "qwen3", "olmo")
