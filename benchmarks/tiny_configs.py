"""Valid tiny random configs for every transformers family (2 layers, d_model 64).

The shared sizes go to the config and to each sub-config that has those fields; per-layer
lists (``layer_types``, ``layers_block_type``, ``attention_layers``...) are shrunk to two
layers keeping distinct kinds (a hybrid keeps one layer of each of its first two kinds);
``FIXES`` holds what a config class's validators require beyond that, read from
``configuration_*.py`` (one line each, with the rule it satisfies).
"""

from __future__ import annotations

N_LAYERS = 2
TINY = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=128, head_dim=16, n_embd=64, n_layer=N_LAYERS, n_head=4,
    n_positions=128, n_inner=128, ffn_dim=128, num_layers=N_LAYERS, num_heads=4, d_model=64, n_layers=N_LAYERS,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4,
    n_shared_experts=1, n_group=1, topk_group=1, shared_expert_intermediate_size=32, first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, embedding_size=64, max_seq_len=128,
    decoder_layers=N_LAYERS, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_layers=N_LAYERS,
    encoder_attention_heads=4, encoder_ffn_dim=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    sliding_window=64, attention_chunk_size=64, rotary_dim=8,
    # non-trivial documented scalings, so a site that misses them is caught
    embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0,
)

#: model_type -> extra config kwargs, each satisfying a validator or a modeling assumption.
FIXES: dict[str, dict] = {
    "dots3_note_text": dict(num_key_value_heads=4, head_dim=16),
    "mamba2": dict(num_heads=8),  # hidden_size * expand (128) == num_heads * head_dim (8 * 16)
    "zaya": dict(num_experts_per_tok=1),  # "supports num_experts_per_tok=1 only"
    "reformer": dict(is_decoder=True, axial_pos_shape=[8, 16], axial_pos_embds_dim=[32, 32]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),  # len(attention_layers) == num_layers
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                                              enable_moe_block=False, use_double_wide_mlp=False,
                                              num_kv_shared_layers=N_LAYERS, num_hidden_layers=N_LAYERS)),  # validators
    "gemma3n_text": dict(num_kv_shared_layers=0, hidden_size_per_layer_input=16, vocab_size_per_layer_input=256),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),  # modeling indexes layer_types
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "zamba2": dict(hybrid_layer_ids=[1]),
    # one hybrid layer leaves tie_weights_keys nothing to tie: keep two
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    "dots3_note": dict(num_key_value_heads=4, adapter_in_dim=64, adapter_input_size=64, adapter_out_dim=64,
                       head_dim=16),  # SWA head_dim == qk_nope_head_dim + qk_rope_head_dim
    # DbrxAttentionConfig lacks the rope_theta its modeling reads; MoE sizes live in ffn_config
    "dbrx": dict(attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},  # clamp(None, None) fails
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
}


def _n_layers(cfg) -> int | None:
    for k in ("num_hidden_layers", "n_layers", "num_layers", "n_layer"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    return None


def _shrink(kinds: list) -> list:
    """Two layers: the first two distinct kinds, in order of first appearance."""
    distinct = list(dict.fromkeys(map(str, kinds)))
    picked = [next(k for k in kinds if str(k) == d) for d in distinct[:N_LAYERS]]
    return (picked * N_LAYERS)[:N_LAYERS]


def _kwargs(cfg) -> dict:
    """TINY restricted to ``cfg``'s fields, plus its per-layer lists shrunk to ``N_LAYERS``."""
    known = set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}))
    out = {k: v for k, v in TINY.items() if k in known}
    if "qk_rope_head_dim" in known:  # MLA: the config derives head_dim from its nope / rope parts
        out.pop("head_dim", None)
    if "kv_lora_rank" in known and "num_key_value_heads" in out:  # MLA keys have every head (repeat_kv = 1)
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    n = _n_layers(cfg)
    for k, v in cfg.to_dict().items():
        if n and isinstance(v, list) and len(v) == n and n != N_LAYERS and k not in out:
            out[k] = _shrink(v)
        elif n and isinstance(v, dict) and v and all(str(i).isdigit() for i in v) and k not in out:
            out[k] = {i: x for i, x in v.items() if int(i) < N_LAYERS}  # per-layer overrides by index
    return out


def tiny_config(model_type: str):
    """A tiny, validator-clean config of ``model_type``."""
    import transformers

    try:
        default = transformers.AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - some defaults fail their own validators (gemma4_assistant)
        if model_type not in FIXES:
            raise
        default = transformers.AutoConfig.for_model(model_type, **FIXES[model_type])
    kwargs = _kwargs(default)
    for name in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = {**sub.to_dict(), **_kwargs(sub), **FIXES.get(getattr(sub, "model_type", ""), {})}
    fixes = FIXES.get(model_type, {})
    subs = getattr(default, "sub_configs", {}) or {}
    for sub in (v for k, v in kwargs.items() if isinstance(v, dict) and k in subs):
        sub.update({k: v for k, v in fixes.items() if k in sub})  # e.g. the assistant's text config
    for k, v in fixes.items():  # a dict fix merges into the sub-config's kwargs
        kwargs[k] = {**kwargs[k], **v} if isinstance(v, dict) and isinstance(kwargs.get(k), dict) else v
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def causal_model(cfg):
    """The causal-LM model for ``cfg`` (MusicGen's causal class takes its decoder sub-config)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
    want = getattr(cls, "config_class", None)
    if want is not None and not isinstance(cfg, want):
        sub = next((getattr(cfg, n) for n in getattr(cfg, "sub_configs", {}) if isinstance(getattr(cfg, n), want)),
                   None)
        if sub is not None:
            return cls(sub)
    return transformers.AutoModelForCausalLM.from_config(cfg)
