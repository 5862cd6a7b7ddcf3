"""Page 4 — head ablation browser: which texts (and tokens) a head helps predict.

For head ``L{layer}H{head}`` the per-token next-token loss is computed on every example with the head
intact and with its ``hook_z`` replaced (:class:`~fxlens.interventions.patches.ZeroPatch`: zeros;
:class:`~fxlens.interventions.patches.MeanPatch`: its mean over every token of every example). The
loss change ``ablated - clean`` is shown per token (red: the head helped predict that token) and the
examples are ranked by their mean change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def _batch_ids(model, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    limit = min(x for x in (model.cfg.n_ctx, max_tokens) if x)
    ids, mask = model.to_tokens_and_mask(list(texts))
    return ids[:, :limit], mask[:, :limit]


@dataclass
class BatchLoss:
    """Per-token losses ``[batch, pos - 1]`` (NaN on padding), top-1 ids, lengths, and the head's summed
    ``hook_z`` over the batch's tokens (for mean ablation)."""

    ids: torch.Tensor
    lengths: list[int]
    loss: torch.Tensor
    top: torch.Tensor
    z_sum: torch.Tensor | None = None
    n_tok: int = 0


@torch.no_grad()
def clean_batch(model, texts: Sequence[str], layer: int, head: int, max_tokens: int = 128) -> BatchLoss:
    """One clean forward of ``texts`` (padded): losses, top-1 predictions and the head's ``hook_z`` sum."""
    site = f"blocks.{layer}.attn.hook_z"
    ids, mask = _batch_ids(model, texts, max_tokens)
    logits, cache = model.run_with_cache(ids, names_filter=[site], attention_mask=mask)
    z = cache[site][:, :, head].float()
    return BatchLoss(ids.cpu(), mask.sum(1).tolist(), per_token_loss(logits, ids, mask).cpu(),
                     logits[:, :-1].argmax(-1).cpu(), (z * mask[..., None]).sum((0, 1)).cpu(), int(mask.sum()))


@torch.no_grad()
def ablated_batch(model, texts: Sequence[str], layer: int, head: int, kind: str | Patch = "zero",
                  mean: Sequence[float] | None = None, max_tokens: int = 128) -> BatchLoss:
    """The same batch with the head ablated: ``kind`` ``"zero"``, ``"mean"`` (writes ``mean``, the head's
    ``[d_head]`` mean ``hook_z``) or any patch for ``blocks.{layer}.attn.hook_z``."""
    ids, mask = _batch_ids(model, texts, max_tokens)
    if isinstance(kind, Patch):
        patch = kind
    elif kind == "zero":
        patch = ZeroPatch(head=head)
    elif kind == "mean":
        if mean is None:
            raise ValueError("mean ablation needs the head's mean hook_z (mean=)")
        ref = torch.zeros(1, 1, model.cfg.n_heads, model.cfg.d_head)
        ref[0, 0, head] = torch.tensor(list(mean))
        patch = MeanPatch(reference=ref, head=head)
    else:
        raise ValueError(f"kind must be one of {KINDS} or a Patch, not {kind!r}")
    with model.patch({f"blocks.{layer}.attn.hook_z": patch}):
        logits = model(ids, attention_mask=mask)
    return BatchLoss(ids.cpu(), mask.sum(1).tolist(), per_token_loss(logits, ids, mask).cpu(),
                     logits[:, :-1].argmax(-1).cpu())


Runner = Callable[..., Any]


def ablate_head(model, texts: Sequence[str], layer: int, head: int, kind: str | Patch = "zero",
                batch_size: int = 8, max_tokens: int = 128, progress: Progress | None = None,
                runner: Runner | None = None) -> AblationResult:
    """Per-token loss of each text with head ``(layer, head)`` intact and ablated, ranked by mean change.

    ``kind``: ``"zero"``, ``"mean"`` (the head's mean ``hook_z`` over all non-padding tokens of
    ``texts``), or any patch for ``blocks.{layer}.attn.hook_z`` (applied to each batch as given).
    Texts are cut to ``max_tokens`` (and the model's context). ``runner(fn, *args)`` runs each
    batch's ``fn(model, *args)`` (default: directly; the app passes its cache).
    """
    check_head(model, layer, head)
    if not isinstance(kind, Patch) and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or a Patch, not {kind!r}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no example texts: give at least one non-empty text")
    run = runner or (lambda fn, *args: fn(model, *args))
    chunks = [tuple(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    steps = 2 * len(chunks)
    clean = []
    for b, chunk in enumerate(chunks):
        clean.append(run(clean_batch, chunk, layer, head, max_tokens))
        if progress:
            progress((b + 1) / steps, f"clean batch {b + 1}/{len(chunks)}")
    mean = None
    if kind == "mean":
        mean = tuple((sum(c.z_sum for c in clean) / max(1, sum(c.n_tok for c in clean))).tolist())
    out = []
    for b, (chunk, c) in enumerate(zip(chunks, clean)):
        a = run(ablated_batch, chunk, layer, head, kind, mean, max_tokens)
        for r, text in enumerate(chunk):
            n = c.lengths[r]
            out.append(ExampleLoss(text, str_tokens(model, c.ids[r, :n]), c.loss[r, :n - 1], a.loss[r, :n - 1],
                                   str_tokens(model, c.top[r, :n - 1]), str_tokens(model, a.top[r, :n - 1])))
        if progress:
            progress((len(chunks) + b + 1) / steps, f"ablated batch {b + 1}/{len(chunks)}")
    out.sort(key=lambda e: -e.mean_delta if e.delta.numel() else 0.0)
    return AblationResult(layer, head, kind if isinstance(kind, str) else type(kind).__name__, out)


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
    res = ablate_head(ctx.model, examples, ctx.layer, ctx.head, kind, progress=report, runner=ctx.run)
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
