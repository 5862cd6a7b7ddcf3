"""Page 1 — attention patterns: every head's pattern over the prompt's tokens, and per-head summaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import Context, heatmap, prompt_tokens, show_token, str_tokens


@dataclass
class AttentionPatterns:
    """``patterns[layer, head, query, key]`` (``hook_pattern``, float32) for one prompt."""

    str_tokens: list[str]
    patterns: torch.Tensor

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]


@torch.no_grad()
def attention_patterns(model, prompt: str) -> AttentionPatterns:
    """One forward caching ``blocks.L.attn.hook_pattern`` for every layer."""
    ids = prompt_tokens(model, prompt)
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids, names_filter=names)
    pats = torch.stack([cache[n][0] for n in names]).float().cpu()
    return AttentionPatterns(str_tokens(model, ids[0]), pats)


def head_summary(patterns: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head ``[n_layers, n_heads]`` summaries of ``patterns [L, H, q, k]``, averaged over queries:

    * ``previous token``: attention to position ``q - 1`` (queries ``q >= 1``);
    * ``first token``: attention to position 0 (often a sink);
    * ``self``: attention to the query's own position;
    * ``entropy (bits)``: entropy of the query's attention distribution.
    """
    q = patterns.shape[-1]
    idx = torch.arange(q)
    out = {"previous token": patterns[..., idx[1:], idx[:-1]].mean(-1) if q > 1 else torch.zeros(patterns.shape[:2]),
           "first token": patterns[..., :, 0].mean(-1),
           "self": patterns[..., idx, idx].mean(-1)}
    p = patterns.clamp_min(0)
    out["entropy (bits)"] = -(p * torch.log2(p.clamp_min(1e-12))).sum(-1).mean(-1)
    return out


def render(ctx: Context) -> None:
    """Layer grid of head patterns, one head in detail, and the per-head summary heatmap."""
    import streamlit as st
    from plotly.subplots import make_subplots

    st.header("Attention patterns")
    st.caption("`blocks.L.attn.hook_pattern`: row = query (destination) token, column = key (source) token.")
    with st.spinner("running the prompt"):
        att: AttentionPatterns = ctx.run(attention_patterns, ctx.prompt)
    toks = [f"{i}:{show_token(t)}" for i, t in enumerate(att.str_tokens)]
    n_heads = att.patterns.shape[1]

    st.subheader(f"Head L{ctx.layer}H{ctx.head}")
    pat = att.patterns[ctx.layer, ctx.head]
    fig = heatmap(pat, toks, toks, diverging=False, xlabel="key (source)", ylabel="query (destination)",
                  hover="attention %{z:.3f}", colorscale="Blues", pair="{y} ← {x}",
                  height=max(360, 22 * len(toks) + 160))
    st.plotly_chart(fig, key="att_head")

    st.subheader(f"All heads of layer {ctx.layer}")
    cols = min(n_heads, st.slider("columns", 1, 8, min(4, n_heads), key="att_cols"))
    rows = -(-n_heads // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"H{h}" for h in range(n_heads)],
                        horizontal_spacing=0.02, vertical_spacing=0.06)
    import plotly.graph_objects as go

    for h in range(n_heads):
        fig.add_trace(go.Heatmap(z=att.patterns[ctx.layer, h].numpy(), coloraxis="coloraxis",
                                 customdata=[[f"{a} ← {b}" for b in toks] for a in toks],
                                 hovertemplate=f"H{h} %{{customdata}}: %{{z:.3f}}<extra></extra>"),
                      row=h // cols + 1, col=h % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(coloraxis=dict(colorscale="Blues", cmin=0, cmax=1), height=260 * rows,
                      margin=dict(l=10, r=10, t=30, b=10))
    st.plotly_chart(fig, key="att_grid")

    st.subheader("Per-head summary over this prompt")
    summary = head_summary(att.patterns)
    which = st.selectbox("statistic", list(summary), key="att_stat")
    st.plotly_chart(heatmap(summary[which], [f"H{h}" for h in range(n_heads)],
                            [f"L{L}" for L in range(att.n_layers)], diverging=False, xlabel="head", ylabel="layer",
                            hover=f"{which} %{{z:.3f}}"), key="att_summary")
