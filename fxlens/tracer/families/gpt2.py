"""GPT-2: LayerNorm, learned positions, fused Conv1D qkv, GELU MLP."""

from .base import Family

GPT2 = Family(
    name="gpt2", model_types=("gpt2",),
    embed="transformer.wte", pos_embed="transformer.wpe", layers="transformer.h", ln_final="transformer.ln_f",
    ln1="ln_1", ln2="ln_2", attn="attn", attn_out="attn.c_proj",
    mlp_act="mlp.act", mlp_out="mlp.c_proj", gated=False,
)
