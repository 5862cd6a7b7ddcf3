"""A family rule: where a model family keeps its parts, as HF module paths.

Rules are data. Paths inside a block are relative to the block (``layers`` + ``.{L}``).
Everything else (which node is which site) is found from the graph by ``locate``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family.

    Attributes:
        name: family name shown in ``cfg.family``.
        model_types: ``config.model_type`` values the rule covers.
        embed: token embedding module.
        layers: the block list (``{layers}.{L}`` is block L).
        ln_final: final norm module (``None`` for encoders without one).
        pos_embed: learned absolute position embedding module, if any.
        ln1: norm feeding attention (pre-norm) or after it (``post_norm``); ``None`` in blocks that
            norm only the sublayer outputs (OLMo 2/3: ``x + norm(attn(x))``, see ``attn_post_norm``),
            which then have no ``ln1.*``/``ln2.*`` and ``hook_mlp_in`` sites.
        ln2: norm feeding the MLP (pre-norm) or after it (``post_norm``); ``None`` in parallel
            blocks whose attention and MLP read one shared norm (GPT-J, Phi-2): those blocks
            have no ``ln2.*`` and ``hook_mlp_in`` sites.
        attn: attention module.
        attn_out: module whose output is the attention output (before post-norms).
        attn_post_norm: norm applied to the attention output before the add (Gemma 2/3).
        mlp_act: activation module; its input is ``mlp.hook_pre``.
        mlp_out: down projection; its input is ``mlp.hook_post``.
        mlp_post_norm: norm applied to the MLP output before the add (Gemma 2/3).
        parallel: attention and MLP read the same residual (GPT-NeoX, Phi-2, GPT-J).
        post_norm: norms sit after the residual adds (BERT).
        gated: the MLP is gated (``act(gate) * up``).
        moe: the MLP is a mixture of experts; ``mlp_out`` is then the whole MoE module and
            ``mlp_act`` is ``None``: per-expert activations are not single tensors, so the
            block has ``mlp.hook_router_logits`` instead of ``mlp.hook_pre/post``.
    """

    name: str
    model_types: tuple[str, ...]
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    ln_final: str | None = "model.norm"
    pos_embed: str | None = None
    ln1: str | None = "input_layernorm"
    ln2: str | None = "post_attention_layernorm"
    attn: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    attn_post_norm: str | None = None
    mlp_act: str | None = "mlp.act_fn"
    mlp_out: str = "mlp.down_proj"
    mlp_post_norm: str | None = None
    parallel: bool = False
    post_norm: bool = False
    gated: bool = True
    moe: bool = False

    def block(self, layer: int, rel: str) -> str:
        """Absolute module path of ``rel`` inside block ``layer``."""
        return f"{self.layers}.{layer}.{rel}" if rel else f"{self.layers}.{layer}"


def llama_like(name: str, *model_types: str, **overrides) -> Family:
    """A Llama-shaped family (pre-RMSNorm, gated MLP, rotary), with overrides."""
    return replace(Family(name=name, model_types=model_types or (name,)), **overrides)


def rerooted(family: Family, model: nn.Module) -> Family:
    """``family`` with its top-level paths moved under the text tower when ``model`` wraps one
    (Gemma 3's and GOT-OCR2's ``model.language_model.layers`` for a rule written as ``model.layers``)."""
    names = dict(model.named_modules())
    if family.layers in names:
        return family
    root, _, tail = family.layers.rpartition(".")
    for path, mod in names.items():
        prefix = path[: -len(tail) - 1]
        if not (isinstance(mod, nn.ModuleList) and path.endswith("." + tail) and prefix.startswith(root)):
            continue
        move = {k: prefix + v[len(root):] for k in ("embed", "layers", "ln_final", "pos_embed")
                if (v := getattr(family, k)) is not None and v.startswith(root)}
        if all(p in names for p in move.values()):
            return replace(family, **move)
    return family

