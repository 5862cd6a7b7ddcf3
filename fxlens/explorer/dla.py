"""Page 2 — direct logit attribution: what each head, MLP and embedding writes towards the answer token.

The residual stream at the chosen position is split into every head's output (``hook_z @ W_O``),
each MLP's output, the embeddings and the summed attention output biases
(:func:`fxlens.interventions.analysis.get_full_resid_decomposition`), each divided by the cached
final-norm scale and projected on ``w_ln_final * W_U[:, answer]`` (minus the counterfactual's
direction). The components plus the final norm's bias / ``b_U`` terms sum exactly to the model's
logit (difference). Models whose blocks norm the branch outputs (Gemma 2/3) raise: there the
residual stream is not a sum of per-head terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interventions import analysis as A
from .common import (
    Context,
    heatmap,
    prompt_str_tokens,
    prompt_tokens,
    show_token,
    single_token,
    str_tokens,
    token_picker,
    top_predictions,
)

_SITES = ("hook_z", "hook_mlp_out", "hook_embed", "hook_pos_embed", "hook_scale", "hook_resid_pre")


@dataclass
class DLAResult:
    """Direct logit attribution at one position.

    Attributes:
        per_head: ``[n_layers, n_heads]``; per_layer: ``[n_layers, 2]`` (attention heads summed, MLP).
        other: embeddings and the summed output biases, ``{label: value}``.
        logit_diff: the model's own logit (difference) at ``position``; bias_terms: the norm-bias /
            ``b_U`` part no component writes. ``total() + bias_terms == logit_diff``.
    """

    str_tokens: list[str]
    position: int
    answer: str
    counterfactual: str | None
    per_head: torch.Tensor
    per_layer: torch.Tensor
    other: dict[str, float]
    logit_diff: float
    bias_terms: float

    def total(self) -> float:
        """Sum of all component attributions (heads, MLPs, embeddings, biases)."""
        return float(self.per_head.sum() + self.per_layer[:, 1].sum()) + sum(self.other.values())

    def components(self) -> list[tuple[str, float]]:
        """Every component as ``(label, value)``, largest magnitude first."""
        n_layers, n_heads = self.per_head.shape
        rows = [(f"L{L}H{h}", float(self.per_head[L, h])) for L in range(n_layers) for h in range(n_heads)]
        rows += [(f"L{L} MLP", float(self.per_layer[L, 1])) for L in range(n_layers)]
        rows += list(self.other.items())
        return sorted(rows, key=lambda r: -abs(r[1]))


@torch.no_grad()
def direct_logit_attribution(model, prompt: str, answer: str | int, counterfactual: str | int | None = None,
                             position: int = -1) -> DLAResult:
    """DLA of ``answer`` (minus ``counterfactual``) predicted at ``position`` (default: the last token).

    Tokens are ids or single-token strings (``" Mary"``, ``"#123"``).
    """
    ids = prompt_tokens(model, prompt)
    pos = position + ids.shape[1] if position < 0 else position
    if not 0 <= pos < ids.shape[1]:
        raise ValueError(f"position {position} is outside the prompt's {ids.shape[1]} tokens")
    ans = answer if isinstance(answer, int) else single_token(model, answer)
    cf = counterfactual if counterfactual is None or isinstance(counterfactual, int) else single_token(
        model, counterfactual)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(_SITES))
    stack, labels = A.get_full_resid_decomposition(cache, model, expand_neurons=False, apply_ln=True,
                                                   pos_slice=pos, return_labels=True)
    attrs = A.scaled_logit_attrs(model, stack, ans, cf)[:, 0].float().cpu()
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    per_head = attrs[: n_layers * n_heads].reshape(n_layers, n_heads)
    index = {lab: i for i, lab in enumerate(labels)}
    mlp = torch.stack([attrs[index[f"{L}_mlp_out"]] for L in range(n_layers)])
    per_layer = torch.stack([per_head.sum(1), mlp], dim=1)
    other = {lab: float(attrs[index[lab]]) for lab in ("embed", "pos_embed", "bias") if lab in index}
    row = logits[0, pos].float()
    diff = row[ans] - (row[cf] if cf is not None else 0.0)
    bias = A.logit_bias_terms(model, ans, cf)
    return DLAResult(str_tokens(model, ids[0]), pos, model.tokenizer.decode([ans]),
                     None if cf is None else model.tokenizer.decode([cf]), per_head, per_layer, other,
                     float(diff), float(bias))


def render(ctx: Context) -> None:
    """Answer / counterfactual pickers, per-head and per-layer heatmaps, a component table."""
    import pandas as pd
    import streamlit as st

    st.header("Direct logit attribution")
    st.caption("What each component writes directly to the answer's logit (minus the counterfactual's), through "
               "the final norm's cached scale. Heads: `hook_z @ W_O`; MLPs: `hook_mlp_out`.")
    toks = ctx.run(prompt_str_tokens, ctx.prompt)
    labels = [f"{i}:{show_token(t)}" for i, t in enumerate(toks)]
    pos = st.selectbox("predict after token", range(len(toks)), index=len(toks) - 1,
                       format_func=lambda i: labels[i], key="dla_pos")
    top = ctx.run(top_predictions, ctx.prompt, pos, 10)
    c1, c2 = st.columns(2)
    with c1:
        answer = token_picker("answer token", top, 0, "dla_answer")
    with c2:
        counter = token_picker("counterfactual token", top, 1 if len(top) > 1 else None, "dla_counter", optional=True)
    if answer is None:
        st.info("type an answer token")
        return
    with st.spinner("decomposing the residual stream"):
        res: DLAResult = ctx.run(direct_logit_attribution, ctx.prompt, answer, counter, pos)
    what = f"logit({show_token(res.answer)})" + (f" − logit({show_token(res.counterfactual)})"
                                                  if res.counterfactual is not None else "")
    m1, m2, m3 = st.columns(3)
    m1.metric(f"model's {what}", f"{res.logit_diff:+.4f}")
    m2.metric("sum of components", f"{res.total():+.4f}")
    m3.metric("norm bias / b_U terms", f"{res.bias_terms:+.4f}")
    n_layers, n_heads = res.per_head.shape
    st.plotly_chart(heatmap(res.per_head, [f"H{h}" for h in range(n_heads)], [f"L{L}" for L in range(n_layers)],
                            title=f"per head: {what}", xlabel="head", ylabel="layer"), key="dla_heads")
    st.plotly_chart(heatmap(res.per_layer, ["attention (heads)", "MLP"], [f"L{L}" for L in range(n_layers)],
                            title=f"per layer: {what}", ylabel="layer", height=max(320, 18 * n_layers + 120)),
                    key="dla_layers")
    rows = res.components()[:25]
    st.dataframe(pd.DataFrame(rows, columns=["component", "attribution"]), key="dla_table")
