"""GPT-NeoX / Pythia: parallel attention + MLP, fused interleaved qkv, partial rotary."""

from .base import Family

NEOX = Family(
    name="gpt_neox", model_types=("gpt_neox",),
    embed="gpt_neox.embed_in", layers="gpt_neox.layers", ln_final="gpt_neox.final_layer_norm",
    attn="attention", attn_out="attention.dense",
    mlp_act="mlp.act", mlp_out="mlp.dense_4h_to_h", parallel=True, gated=False,
)
