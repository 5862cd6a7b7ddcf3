"""TransformerLens' shorthand for site names: ``act_name("k6")`` -> ``blocks.6.attn.hook_k``."""

from __future__ import annotations

import re

_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
              "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post", "scores": "attn_scores"}
_ATTN = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "mid", "pre_linear"}


def act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """Full site name from TL shorthand (TransformerLens' ``get_act_name`` rules).

    ``act_name("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``; ``act_name("k6")`` -> ``blocks.6.attn.hook_k``;
    ``act_name("scale4ln1")`` / ``act_name("scale", 4, "ln1")`` -> ``blocks.4.ln1.hook_scale``;
    ``act_name("scale")`` -> ``ln_final.hook_scale``; a full name is returned as is. Aliases: ``attn``
    (pattern), ``attn_logits`` / ``scores`` (attn_scores), ``key`` / ``query`` / ``value``, ``mlp_pre`` /
    ``mlp_mid`` / ``mlp_post``; layer types ``a`` / ``attention`` (attn), ``m`` (mlp), ``b`` / ``block``.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_ALIAS.get(name, name)
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if name in ("scale", "normalized") and layer is None:
        return f"ln_final.hook_{name}"  # TL would give ln_final.ln_final.hook_... for layer_type="ln_final"
    full = f"blocks.{layer}." if layer is not None else ""
    full += f"{layer_type}." if layer_type else ""
    return full + f"hook_{name}"
