"""Page 4 — head ablation browser: which texts (and tokens) a head helps predict.

For head ``L{layer}H{head}`` the per-token next-token loss is computed on every example with the head
intact and with its ``hook_z`` replaced (:class:`~fxlens.interventions.patches.ZeroPatch`: zeros;
:class:`~fxlens.interventions.patches.MeanPatch`: its mean over every token of every example). The
loss change ``ablated - clean`` is shown per token (red: the head helped predict that token) and the
examples are ranked by their mean change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..interventions.patches import MeanPatch, Patch, ZeroPatch
from .common import EXAMPLES, Context, Progress, check_head, colored_tokens_html, progress_bar, show_token, str_tokens

KINDS = ("zero", "mean")


def per_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, pos - 1]`` next-token cross-entropy; NaN where the target is padding."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if mask is not None:
        nll = nll.masked_fill(mask[:, 1:] == 0, float("nan"))
    return nll


@dataclass
class ExampleLoss:
    """One text: its tokens and the loss of predicting each token after the first, clean and ablated."""

    text: str
    str_tokens: list[str]
    clean: torch.Tensor
    ablated: torch.Tensor
    clean_top: list[str] = field(default_factory=list)
    ablated_top: list[str] = field(default_factory=list)

    @property
    def delta(self) -> torch.Tensor:
        """``ablated - clean`` per predicted token ``[pos - 1]``."""
        return self.ablated - self.clean

    @property
    def mean_delta(self) -> float:
        return float(self.delta.mean())


@dataclass
class AblationResult:
    """Examples ranked by mean loss change (largest first) when head ``L{layer}H{head}`` is ablated."""

    layer: int
    head: int
    kind: str
    examples: list[ExampleLoss]


def _batches(model, texts: Sequence[str], batch_size: int, max_tokens: int):
    limit = min(x for x in (model.cfg.n_ctx, max_tokens) if x)
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        ids = model.to_tokens(chunk)
        mask = model.last_attention_mask
        yield chunk, ids[:, :limit], mask[:, :limit]


@torch.no_grad()
def ablate_head(model, texts: Sequence[str], layer: int, head: int, kind: str | Patch = "zero",
                batch_size: int = 8, max_tokens: int = 128, progress: Progress | None = None) -> AblationResult:
    """Per-token loss of each text with head ``(layer, head)`` intact and ablated, ranked by mean change.

    ``kind``: ``"zero"``, ``"mean"`` (the head's mean ``hook_z`` over all non-padding tokens of
    ``texts``), or any patch for ``blocks.{layer}.attn.hook_z`` (applied to each batch as given).
    Texts are cut to ``max_tokens`` (and the model's context).
    """
    check_head(model, layer, head)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no example texts: give at least one non-empty text")
    site = f"blocks.{layer}.attn.hook_z"
    batches = list(_batches(model, texts, batch_size, max_tokens))
    steps = 2 * len(batches)
    clean_runs, z_sum, n_tok = [], 0.0, 0
    for b, (chunk, ids, mask) in enumerate(batches):
        logits, cache = model.run_with_cache(ids, names_filter=[site], attention_mask=mask)
        z = cache[site][:, :, head]
        z_sum = z_sum + (z * mask[..., None]).sum((0, 1))
        n_tok += int(mask.sum())
        clean_runs.append((per_token_loss(logits, ids, mask).cpu(), logits[:, :-1].argmax(-1).cpu()))
        if progress:
            progress((b + 1) / steps, f"clean batch {b + 1}/{len(batches)}")
    if isinstance(kind, Patch):
        patch, label = kind, type(kind).__name__
    elif kind == "zero":
        patch, label = ZeroPatch(head=head), "zero"
    elif kind == "mean":
        ref = torch.zeros(1, 1, model.cfg.n_heads, model.cfg.d_head, dtype=z.dtype, device=z.device)
        ref[0, 0, head] = z_sum / max(n_tok, 1)
        patch, label = MeanPatch(reference=ref, head=head), "mean"
    else:
        raise ValueError(f"kind must be one of {KINDS} or a Patch, not {kind!r}")
    out = []
    with model.patch({site: patch}):
        for b, ((chunk, ids, mask), (clean, clean_top)) in enumerate(zip(batches, clean_runs)):
            logits = model(ids, attention_mask=mask)
            ablated, abl_top = per_token_loss(logits, ids, mask).cpu(), logits[:, :-1].argmax(-1).cpu()
            for r, text in enumerate(chunk):
                n = int(mask[r].sum())
                toks = str_tokens(model, ids[r, :n])
                out.append(ExampleLoss(text, toks, clean[r, :n - 1], ablated[r, :n - 1],
                                       str_tokens(model, clean_top[r, :n - 1]), str_tokens(model, abl_top[r, :n - 1])))
            if progress:
                progress((len(batches) + b + 1) / steps, f"ablated batch {b + 1}/{len(batches)}")
    out.sort(key=lambda e: -e.mean_delta if e.delta.numel() else 0.0)
    return AblationResult(layer, head, label, out)


def render(ctx: Context) -> None:
    """Ablation controls, the ranked example table, and coloured per-token loss changes."""
    import pandas as pd
    import streamlit as st

    st.header(f"Head ablation browser: L{ctx.layer}H{ctx.head}")
    c1, c2 = st.columns([1, 3])
    kind = c1.radio("ablation", KINDS, key="abl_kind", help="zero: hook_z of the head set to 0; mean: set to its "
                    "mean over every token of the examples below")
    texts = c2.text_area("examples (one per line; \\n inside a line is a newline)", value="\n".join(
        t.replace("\n", "\\n") for t in EXAMPLES), height=160, key="abl_texts")
    examples = tuple(t.replace("\\n", "\n") for t in texts.splitlines() if t.strip())
    report, clear = progress_bar(f"ablating L{ctx.layer}H{ctx.head} on {len(examples)} examples")
    res: AblationResult = ctx.run(ablate_head, examples, ctx.layer, ctx.head, kind, progress=report)
    clear()
    st.dataframe(pd.DataFrame({
        "example": [e.text[:80].replace("\n", "↵") for e in res.examples],
        "mean Δ loss": [e.mean_delta for e in res.examples],
        "max Δ loss": [float(e.delta.max()) if e.delta.numel() else 0.0 for e in res.examples],
        "clean loss": [float(e.clean.mean()) if e.clean.numel() else 0.0 for e in res.examples]}),
        key="abl_table")
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[e.mean_delta for e in res.examples], y=list(range(len(res.examples))), orientation="h",
                           customdata=[e.text[:60].replace("\n", "↵") for e in res.examples],
                           hovertemplate="%{customdata}<br>mean Δ loss %{x:+.4f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", tickvals=list(range(len(res.examples))),
                     ticktext=[e.text[:24].replace("\n", "↵") for e in res.examples])
    fig.update_layout(title=f"mean loss change per example ({res.kind}-ablating L{res.layer}H{res.head})",
                      xaxis_title="Δ loss (nats/token)", height=max(300, 24 * len(res.examples) + 100),
                      margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(fig, key="abl_bar")
    vmax = max((float(e.delta.abs().max()) for e in res.examples if e.delta.numel()), default=1.0)
    st.markdown(f"**Per-token loss change** (token coloured by the change in the loss of predicting it; red = "
                f"the head helped; scale ±{vmax:.3f} nats, hover for values)")
    for i, e in enumerate(res.examples[: st.slider("examples shown", 1, len(res.examples),
                                                    min(8, len(res.examples)), key="abl_shown")]):
        st.html(colored_tokens_html(e.str_tokens, [float("nan")] + e.delta.tolist(), vmax))
    pick = st.selectbox("details for", range(len(res.examples)), key="abl_pick",
                        format_func=lambda i: res.examples[i].text[:80].replace("\n", "↵"))
    e = res.examples[pick]
    st.dataframe(pd.DataFrame({
        "context ends with": [show_token(t) for t in e.str_tokens[:-1]],
        "next token": [show_token(t) for t in e.str_tokens[1:]],
        "clean loss": e.clean.tolist(), "ablated loss": e.ablated.tolist(), "Δ": e.delta.tolist(),
        "clean top-1": [show_token(t) for t in e.clean_top], "ablated top-1": [show_token(t) for t in e.ablated_top],
    }), key="abl_detail")
