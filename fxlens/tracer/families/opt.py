"""OPT: LayerNorm, learned positions, MLP computed on flattened ``[batch*pos, d]`` rows."""

from .base import Family

OPT = Family(
    name="opt", model_types=("opt",),
    embed="model.decoder.embed_tokens", pos_embed="model.decoder.embed_positions",
    layers="model.decoder.layers", ln_final="model.decoder.final_layer_norm",
    ln1="self_attn_layer_norm", ln2="final_layer_norm", attn_out="self_attn.out_proj",
    mlp_act="activation_fn", mlp_out="fc2", gated=False,
)
