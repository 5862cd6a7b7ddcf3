"""Page 3 — OV and QK circuits of one head, read from the weights (no prompt).

Definitions (``L``, ``h`` the head; ``x_t = ln1_L(W_E[t])``, block ``L``'s attention norm applied to token
``t``'s embedding as if it were the whole residual stream (``W_E[t]`` itself in blocks without one);
``u_t = w_ln_final * W_U[:, t]``, the direction that writes token ``t``'s logit):

* full OV circuit: ``OV[s, t] = x_s @ W_V[L,h] @ W_O[L,h] @ u_t`` — how much attending to source token
  ``s`` raises the logit of ``t`` (``model.OV`` as a :class:`FactoredMatrix`; value/output biases left out);
* full QK circuit: ``QK[q, k] = x_q @ W_Q[L,h] @ W_K[L,h].T @ x_k / sqrt(d_head)`` — the content part of
  the attention score of query token ``q`` on key token ``k`` (``model.QK``; rotary positions and
  biases left out);
* copying score: ``sum(λ) / sum(|λ|)`` over the eigenvalues ``λ`` of the full OV circuit (real parts
  in the numerator), in ``[-1, 1]``: 1 for a head that copies, -1 for one that suppresses the token
  it attends to. Computed on the whole vocabulary (cheap: the ``d_head`` non-zero eigenvalues are
  those of the ``d_head x d_head`` product the other way round) and on the chosen token subset.

The matrices shown are restricted to a token subset (the user's tokens plus the most frequent
tokens of some text, or a range of ids) so a 49k vocabulary stays small; each row's top outputs
(OV) / keys (QK) are searched over the whole vocabulary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..interventions import analysis as A
from ..interventions.factored_matrix import FactoredMatrix
from .common import EXAMPLES, Context, check_head, heatmap, parse_token_list, show_token, vocab_strings


def token_subset(model, user_tokens: str = "", n_frequent: int = 40, texts: Sequence[str] = EXAMPLES,
                 id_range: tuple[int, int] | None = None) -> list[int]:
    """The user's comma-separated tokens (words get a leading space), then either the ``n_frequent``
    most frequent tokens of ``texts`` (special tokens excluded) or the ids in ``id_range``."""
    ids = parse_token_list(model, user_tokens) if user_tokens.strip() else []
    if id_range is not None:
        lo, hi = max(0, id_range[0]), min(model.cfg.d_vocab, id_range[1])
        extra = list(range(lo, hi))
    else:
        special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        counts = Counter(t for text in texts for t in model.tokenizer(text, add_special_tokens=False)["input_ids"]
                         if t not in special)
        extra = [t for t, _ in counts.most_common(n_frequent)]
    out = list(dict.fromkeys(ids + extra))
    if not out:
        raise ValueError("the token subset is empty: give tokens, texts or an id range")
    return out


DEFAULT_WORDS = ("Mary", "John", "Paris", "France", "cat", "dog", "one", "two")


def default_words(model, words: Sequence[str] = DEFAULT_WORDS) -> str:
    """The comma-joined ``words`` this tokenizer has as single tokens (the page's starting subset)."""
    keep = []
    for w in words:
        try:
            parse_token_list(model, w)
            keep.append(w)
        except ValueError:
            continue
    return ", ".join(keep)


def copying_score(fm: FactoredMatrix) -> float:
    """``sum(Re λ) / sum(|λ|)`` over the eigenvalues of a square factored matrix, in ``[-1, 1]``."""
    lam = fm.eigenvalues
    denom = float(lam.abs().sum())
    return float(lam.real.sum()) / denom if denom > 0 else 0.0


def _inputs(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """``ln1_L(W_E[ids])``: what the head's q/k/v read if the residual stream were the embedding."""
    if model.family.post_norm:
        raise ValueError(f"{model.cfg.family} norms after the residual add: the head reads the raw residual, "
                         "and this page's embedding-through-ln1 circuits are not defined for it")
    if model.family.ln1 is None:  # no pre-attention norm (OLMo 2): q/k/v read the residual stream itself
        return model.W_E[ids.to(model.W_E.device)].detach().float()
    ln1 = model.hf_model.get_submodule(model.family.block(layer, model.family.ln1))
    with torch.no_grad():
        return ln1(model.W_E[ids.to(model.W_E.device)]).float()


def _unembed_dirs(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, d_model]`` logit directions ``w_ln_final * W_U[:, t]`` (all tokens when ``ids`` is None)."""
    if ids is None:
        w, _ = model.ln_final_affine()
        return (model.W_U * w[:, None]).T.float()
    return A.tokens_to_residual_directions(model, ids).reshape(ids.numel(), -1).float()


@dataclass
class HeadCircuits:
    """OV and QK circuits of head ``L{layer}H{head}`` on a token subset (see the module docstring).

    ``ov[s, t]`` / ``qk[q, k]`` are ``[n, n]`` over ``token_ids``; ``ov_top[s]`` / ``qk_top[q]`` list the
    top ``(token, value)`` over the whole vocabulary. ``*_diag_top1``: fraction of subset rows whose
    own token is the row's maximum within the subset.
    """

    layer: int
    head: int
    token_ids: list[int]
    tokens: list[str]
    ov: torch.Tensor
    qk: torch.Tensor
    ov_top: list[list[tuple[str, float]]]
    qk_top: list[list[tuple[str, float]]]
    copying_score: float
    copying_score_subset: float
    ov_diag_top1: float
    qk_diag_top1: float


def _top(rows: torch.Tensor, names: list[str], k: int) -> list[list[tuple[str, float]]]:
    v, i = rows.topk(min(k, rows.shape[-1]), dim=-1)
    return [[(names[j], float(x)) for j, x in zip(ii, vv)] for ii, vv in zip(i.tolist(), v.tolist())]


@torch.no_grad()
def head_circuits(model, layer: int, head: int, token_ids: Sequence[int], k: int = 5) -> HeadCircuits:
    """Full OV and QK circuits of one head on ``token_ids``, top ``k`` per row over the vocabulary."""
    check_head(model, layer, head)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    ov, qk = model.OV[layer, head], model.QK[layer, head]
    ovA, ovB, qkA, qkB = (t.float() for t in (ov.A, ov.B, qk.A, qk.B))
    x_all = _inputs(model, layer, torch.arange(model.cfg.d_vocab))
    u_all = _unembed_dirs(model)
    x, u = x_all[ids], u_all[ids]
    ov_sub = FactoredMatrix(x @ ovA, ovB @ u.T)
    ov_all = FactoredMatrix(x_all @ ovA, ovB @ u_all.T)
    scale = 1 / math.sqrt(model.cfg.d_head)
    q = x @ qkA
    qk_sub = (q @ (qkB @ x.T)) * scale
    vocab = vocab_strings(model)
    ov_rows = (x @ ovA) @ (ovB @ u_all.T)
    qk_rows = (q @ (qkB @ x_all.T)) * scale
    own = torch.arange(len(ids))
    m_ov = ov_sub.AB
    return HeadCircuits(
        layer, head, ids.tolist(), [vocab[t] for t in ids.tolist()], m_ov.cpu(), qk_sub.cpu(),
        _top(ov_rows, vocab, k), _top(qk_rows, vocab, k), copying_score(ov_all), copying_score(ov_sub),
        float((m_ov.argmax(-1) == own).float().mean()), float((qk_sub.argmax(-1) == own).float().mean()))


def top_pairs(matrix: torch.Tensor, row_tokens: list[str], col_tokens: list[str], k: int = 20,
              largest: bool = True) -> list[tuple[str, str, float]]:
    """The ``k`` largest (or smallest) entries of ``matrix`` as ``(row token, column token, value)``."""
    v, i = matrix.flatten().topk(min(k, matrix.numel()), largest=largest)
    n = matrix.shape[1]
    return [(row_tokens[j // n], col_tokens[j % n], float(x)) for j, x in zip(i.tolist(), v.tolist())]


def render(ctx: Context) -> None:
    """Token subset controls, copying scores, OV / QK heatmaps and top mappings."""
    import pandas as pd
    import streamlit as st

    st.header(f"OV and QK circuits of L{ctx.layer}H{ctx.head}")
    st.caption("Embeddings through the layer's attention norm (`ln1`), unembedding through the final norm's "
               "weight; QK is the content-only score (no rotary positions). See `fxlens/explorer/circuits.py`.")
    c1, c2, c3 = st.columns([3, 1, 1])
    user = c1.text_input("tokens (comma-separated words, tried with a leading space first; #id for ids)",
                         value=ctx.run(default_words, DEFAULT_WORDS), key="circ_tokens")
    source = c2.radio("plus", ["frequent tokens of the example texts", "a range of ids"], key="circ_source")
    n = c3.number_input("how many", 0, 400, 40, key="circ_n")
    id_range = None
    if source == "a range of ids":
        start = st.number_input("first id", 0, ctx.model.cfg.d_vocab - 1, min(1000, ctx.model.cfg.d_vocab // 2),
                                key="circ_start")
        id_range = (int(start), int(start) + int(n))
    ids = ctx.run(token_subset, user, int(n), EXAMPLES, id_range)
    with st.spinner(f"computing circuits over {len(ids)} tokens"):
        res: HeadCircuits = ctx.run(head_circuits, ctx.layer, ctx.head, tuple(ids))
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("copying score (whole vocabulary)", f"{res.copying_score:+.3f}")
    m2.metric("copying score (this subset)", f"{res.copying_score_subset:+.3f}")
    m3.metric("OV: own token is top output", f"{res.ov_diag_top1:.0%}")
    m4.metric("QK: own token is top key", f"{res.qk_diag_top1:.0%}")
    labels = [show_token(t) for t in res.tokens]
    show = min(len(labels), st.slider("tokens in the heatmaps", 2, max(2, min(len(labels), 120)),
                                      min(len(labels), 40), key="circ_show"))
    tabs = st.tabs(["OV circuit", "QK circuit"])
    for tab, name, mat, top, axes in (
            (tabs[0], "OV", res.ov, res.ov_top, ("source (attended) token", "output logit")),
            (tabs[1], "QK", res.qk, res.qk_top, ("query token", "key token"))):
        with tab:
            st.plotly_chart(heatmap(mat[:show, :show], labels[:show], labels[:show], title=f"full {name} circuit",
                                    xlabel=axes[1], ylabel=axes[0], pair="{y} → {x}",
                                    height=max(400, 14 * show + 160)), key=f"circ_{name}")
            a, b = st.columns(2)
            a.markdown(f"**top {axes[1]}s over the whole vocabulary, per {axes[0]}**")
            a.dataframe(pd.DataFrame({axes[0]: labels, "top": [", ".join(f"{show_token(t)} ({v:+.2f})" for t, v in r)
                                                               for r in top]}), key=f"circ_{name}_rows")
            b.markdown("**largest pairs in the subset**")
            b.dataframe(pd.DataFrame([(show_token(r), show_token(c), v) for r, c, v in top_pairs(mat, res.tokens,
                                                                                                  res.tokens)],
                                     columns=[axes[0], axes[1], "value"]), key=f"circ_{name}_pairs")
