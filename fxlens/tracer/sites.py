"""The site catalogue: every hook name fxlens places, what tensor it is, its shape.

A site name is a contract about which tensor it holds. Per-layer names are templates
with ``{L}``. Shapes use ``batch, pos, d_model, n_heads, n_kv_heads, d_head, d_mlp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SiteSpec:
    """What a site means and the shape of the tensor a hook sees there."""

    name: str
    meaning: str
    shape: str


_SPECS = [
    SiteSpec("hook_embed", "token embedding as added to the residual stream (scaled where the model scales it)",
             "[batch, pos, d_model]"),
    SiteSpec("hook_pos_embed", "absolute position embedding (learned or a fixed table module; [pos, d_model] "
             "where the model adds it unbatched)", "[batch or 1, pos, d_model]"),
    SiteSpec("blocks.{L}.hook_resid_pre", "residual stream entering block L", "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.ln1.hook_scale", "ln1 scale: sqrt(var + eps) (LayerNorm) or sqrt(mean(x^2) + eps) (RMSNorm)",
             "[batch, pos, 1]"),
    SiteSpec("blocks.{L}.ln1.hook_normalized", "ln1's normalised input before its weight (TransformerLens' tensor): "
             "x / scale (RMSNorm) or (x - mean) / scale (LayerNorm); a hook's edit flows through the weight",
             "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.ln1.hook_out", "ln1 output, weight (and bias) applied: what attention reads (fxlens only)",
             "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.hook_attn_in", "attention input, one copy per head (before ln1)",
             "[batch, pos, n_heads, d_model]"),
    SiteSpec("blocks.{L}.hook_q_input", "query input, one copy per head (before ln1)",
             "[batch, pos, n_heads, d_model]"),
    SiteSpec("blocks.{L}.hook_k_input", "key input, one copy per KV head (before ln1)",
             "[batch, pos, n_kv_heads, d_model]"),
    SiteSpec("blocks.{L}.hook_v_input", "value input, one copy per KV head (before ln1)",
             "[batch, pos, n_kv_heads, d_model]"),
    SiteSpec("blocks.{L}.attn.hook_q", "queries: projection output split into heads, before QK-norm and rotary "
             "(multi-head latent attention: the query entering attention, after rotary and the nope/rope concat)",
             "[batch, pos, n_heads, d_head]"),
    SiteSpec("blocks.{L}.attn.hook_k", "keys, before QK-norm, rotary and GQA repetition "
             "(multi-head latent attention: the key entering attention)",
             "[batch, pos, n_kv_heads, d_head]"),
    SiteSpec("blocks.{L}.attn.hook_v", "values, before GQA repetition (latent attention: its own head size)",
             "[batch, pos, n_kv_heads, d_head]"),
    SiteSpec("blocks.{L}.attn.hook_rot_q", "queries after rotary embedding (and QK-norm)",
             "[batch, pos, n_heads, d_head]"),
    SiteSpec("blocks.{L}.attn.hook_rot_k", "keys after rotary embedding (and QK-norm)",
             "[batch, pos, n_kv_heads, d_head]"),
    SiteSpec("blocks.{L}.attn.hook_attn_scores", "scaled, masked attention logits (-inf where masked)",
             "[batch, n_heads, q_pos, k_pos]"),
    SiteSpec("blocks.{L}.attn.hook_pattern", "attention probabilities (softmax of scores)",
             "[batch, n_heads, q_pos, k_pos]"),
    SiteSpec("blocks.{L}.attn.hook_z", "per-head attention output before the output projection (after a per-head "
             "output gate where the model has one)",
             "[batch, pos, n_heads, d_head]"),
    SiteSpec("blocks.{L}.hook_attn_out", "attention output as added to the residual stream",
             "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.hook_resid_mid", "residual stream after attention, before the MLP (not in parallel blocks)",
             "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.hook_mlp_in", "MLP input before ln2", "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.ln2.hook_scale", "ln2 scale", "[batch, pos, 1]"),
    SiteSpec("blocks.{L}.ln2.hook_normalized", "ln2's normalised input before its weight", "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.ln2.hook_out", "ln2 output, weight (and bias) applied: what the MLP reads (fxlens only)",
             "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.mlp.hook_pre", "MLP pre-activation (gate projection in gated MLPs)", "[batch, pos, d_mlp]"),
    SiteSpec("blocks.{L}.mlp.hook_pre_linear", "gated MLPs: the linear (up) projection", "[batch, pos, d_mlp]"),
    SiteSpec("blocks.{L}.mlp.hook_post", "MLP hidden activation, input of the down projection", "[batch, pos, d_mlp]"),
    SiteSpec("blocks.{L}.mlp.hook_router_logits", "mixture-of-experts blocks: router logits, one per expert",
             "[batch, pos, n_experts]"),
    SiteSpec("blocks.{L}.hook_mlp_out", "MLP output as added to the residual stream", "[batch, pos, d_model]"),
    SiteSpec("blocks.{L}.hook_resid_post", "residual stream leaving block L", "[batch, pos, d_model]"),
    SiteSpec("ln_final.hook_scale", "final norm scale", "[batch, pos, 1]"),
    SiteSpec("ln_final.hook_normalized", "final norm's normalised input before its weight", "[batch, pos, d_model]"),
    SiteSpec("ln_final.hook_out", "final norm output, weight (and bias) applied: what the unembedding reads "
             "(fxlens only; HF's last hidden state)", "[batch, pos, d_model]"),
]

SPECS: dict[str, SiteSpec] = {s.name: s for s in _SPECS}
_INDEX = {name: i for i, name in enumerate(SPECS)}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def template(name: str) -> str:
    """``blocks.3.attn.hook_q`` -> ``blocks.{L}.attn.hook_q``."""
    return _LAYER_RE.sub("blocks.{L}.", name)


def layer_of(name: str) -> int | None:
    """Block index of a site name, ``None`` for sites outside blocks."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def site_rank(name: str, n_layers: int) -> tuple[int, int]:
    """Forward order of sites: embeddings, then block by block in catalogue order, then ln_final."""
    layer = layer_of(name)
    if layer is None:
        layer = -1 if name.startswith("hook_") else n_layers
    return layer, _INDEX[template(name)]


def spec(name: str) -> SiteSpec:
    """The catalogue entry for a concrete site name."""
    return SPECS[template(name)]


def site_dims(name: str) -> list[str]:
    """Dim names of a site from the catalogue, e.g. ``["batch", "pos", "n_heads", "d_head"]``."""
    return [d.strip() for d in spec(name).shape.strip("[]").split(",")]


@dataclass
class Site:
    """Where a site sits in the captured graph.

    Attributes:
        name: TransformerLens name.
        node: name of the graph node holding the value (after ``derive`` has run).
        layout: how the node's tensor maps to the site shape: ``"same"``, ``"heads"``
            (``[.., H*D]`` viewed as ``[.., H, D]``), ``"bhsd"`` (transposed heads) or
            ``"flat"`` (``[batch*pos, ..]`` viewed as ``[batch, pos, ..]``).
        derive: ``None`` when the node exists in the captured graph; otherwise the pass
            that creates it on demand (``"attention"``, ``"norm_scale"`` (a norm's scale, and the
            normalised vector of a fused ``layer_norm``), ``"split_input"``).
        module: HF module path the site belongs to.
        found_by: ``"rule"`` or ``"discovery"``.
        extra: pass-specific data (e.g. the SDPA node, head counts).
    """

    name: str
    node: str | None
    layout: str = "same"
    derive: str | None = None
    module: str = ""
    found_by: str = "rule"
    extra: dict = field(default_factory=dict)


def hook_names_markdown() -> str:
    """The site table as Markdown (source of ``docs/hook_names.md``)."""
    rows = ["| site | meaning | shape |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {s.meaning} | `{s.shape}` |" for s in _SPECS]
    return "\n".join(rows) + "\n"
