"""BERT-style encoders (``AutoModel``): post-norm blocks, learned positions."""

from .base import Family

BERT = Family(
    name="bert", model_types=("bert", "roberta"),
    embed="embeddings.word_embeddings", pos_embed="embeddings.position_embeddings",
    layers="encoder.layer", ln_final=None,
    ln1="attention.output.LayerNorm", ln2="output.LayerNorm", attn="attention.self",
    attn_out="attention.output.dense", mlp_act="intermediate.intermediate_act_fn", mlp_out="output.dense",
    post_norm=True, gated=False,
)
