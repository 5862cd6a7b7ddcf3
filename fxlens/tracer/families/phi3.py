"""Phi-3: Llama layout with fused qkv and fused gate/up projections."""

from .base import llama_like

PHI3 = llama_like("phi3", "phi3", mlp_act="mlp.activation_fn")
