"""Page 5 — lens view: what the residual stream predicts at every layer, and just before a head writes.

Trajectory: the logit lens (or a tuned lens loaded from a folder) decodes the residual stream entering
every block (``blocks.i.hook_resid_pre``; last row: the model's output), as in
:class:`fxlens.lenses.PredictionTrajectory`.

Around head ``h`` of layer ``L`` (heads of a layer write in parallel, so "before" means "everything
but this head"), with ``result_{L,h} = hook_z[L][:, :, h] @ W_O[L, h]``:

* ``head input``   = ``resid_pre[L]`` — what the head (every head of layer ``L``) reads;
* ``before head``  = ``resid_pre[L] + attn_out[L] - result_{L,h}`` — the layer's attention output
  (all other heads and ``b_O``) added, this head's not yet;
* ``after head``   = ``resid_pre[L] + attn_out[L]`` (``= resid_mid[L]`` in sequential blocks).

All three are decoded by the lens at lens layer ``L`` (for a tuned lens that is translator ``L``, trained
on ``resid_pre[L]``: an approximation for the two mid-layer streams; the logit lens needs no
choice). ``after - before`` is the head's direct effect on the decoded distribution. Models that norm
the attention output before the add (Gemma 2/3) raise: there the head's term cannot be subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lenses import Lens, LogitLens, PredictionTrajectory, load_lens
from .common import Context, check_head, heatmap, prompt_tokens, show_token, str_tokens

_LENSES: dict[tuple[int, str | None], tuple[object, Lens]] = {}
STREAMS = ("head input", "before head", "after head", "output")


def get_lens(model, lens_path: str | None = None) -> Lens:
    """The logit lens (``lens_path`` empty) or the tuned lens saved in ``lens_path``; memoised per model."""
    key = (id(model), lens_path or None)
    hit = _LENSES.get(key)
    if hit is None or hit[0] is not model:
        lens = load_lens(model, lens_path) if lens_path else LogitLens(model)
        hit = _LENSES[key] = (model, lens.eval())
    return hit[1]


@torch.no_grad()
def lens_trajectory(model, prompt: str, lens_path: str | None = None) -> PredictionTrajectory:
    """:meth:`PredictionTrajectory.from_lens` for ``prompt`` (cut to the model's context)."""
    name = "tuned lens" if lens_path else "logit lens"
    return PredictionTrajectory.from_lens(model, get_lens(model, lens_path), prompt_tokens(model, prompt)[0], name)


@torch.no_grad()
def head_streams(model, ids: torch.Tensor, layer: int, head: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"head input", "before head", "after head": [batch, pos, d_model]}, logits)``, as defined above."""
    check_head(model, layer, head)
    fam = model.family
    if fam.attn_post_norm or fam.post_norm:
        raise ValueError(f"{model.cfg.family} norms the attention output before (or after) the residual add: "
                         "a single head's term cannot be removed from the residual stream")
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.attn.hook_z"]
    logits, cache = model.run_with_cache(ids, names_filter=names)
    pre, attn_out, z = (cache[n] for n in names)
    result = z[:, :, head] @ model.W_O[layer, head]
    after = pre + attn_out
    return {"head input": pre, "before head": after - result, "after head": after}, logits


@dataclass
class HeadLens:
    """Lens predictions around head ``L{layer}H{head}`` for one prompt.

    ``top[stream][pos]``: the ``k`` most likely next tokens ``(text, probability)`` for each of
    :data:`STREAMS`; ``target_prob[stream]``: probability of the actual next token ``[pos]`` (NaN at the
    last position); ``pushed_up`` / ``pushed_down[pos]``: tokens whose log-probability the head raises /
    lowers most (``after - before``), with the change.
    """

    layer: int
    head: int
    str_tokens: list[str]
    top: dict[str, list[list[tuple[str, float]]]]
    target_prob: dict[str, torch.Tensor]
    pushed_up: list[list[tuple[str, float]]]
    pushed_down: list[list[tuple[str, float]]]


@torch.no_grad()
def head_lens(model, prompt: str, layer: int, head: int, lens_path: str | None = None, k: int = 5) -> HeadLens:
    """Decode the streams around head ``(layer, head)`` with the lens at lens layer ``layer``."""
    lens = get_lens(model, lens_path)
    ids = prompt_tokens(model, prompt)
    streams, logits = head_streams(model, ids, layer, head)
    logp = {name: torch.log_softmax(lens(x, layer)[0].float(), -1) for name, x in streams.items()}
    logp["output"] = torch.log_softmax(logits[0].float(), -1)
    toks = str_tokens(model, ids[0])
    nxt = ids[0, 1:].to(logp["output"].device)

    def tops(values: torch.Tensor, largest: bool = True, prob: bool = True) -> list[list[tuple[str, float]]]:
        v, i = values.topk(k, dim=-1, largest=largest)
        v = v.exp() if prob else v
        return [[(model.tokenizer.decode([t]), float(x)) for t, x in zip(ii, vv)] for ii, vv in zip(i.tolist(),
                                                                                                     v.tolist())]

    target = {}
    for name, lp in logp.items():
        t = torch.full((ids.shape[1],), float("nan"))
        t[:-1] = lp[:-1].gather(-1, nxt[:, None]).squeeze(-1).exp().cpu()
        target[name] = t
    change = logp["after head"] - logp["before head"]
    return HeadLens(layer, head, toks, {n: tops(lp) for n, lp in logp.items()}, target,
                    tops(change, prob=False), tops(change, largest=False, prob=False))


def render(ctx: Context) -> None:
    """Trajectory heatmap and the before/after-head table at a chosen position."""
    import pandas as pd
    import streamlit as st

    st.header("Lens view")
    lens_path = st.text_input("tuned lens folder (empty: logit lens)", value=ctx.lens_path or "", key="lens_path")
    lens_path = lens_path.strip() or None
    with st.spinner("decoding every layer"):
        traj: PredictionTrajectory = ctx.run(lens_trajectory, ctx.prompt, lens_path)
    value = st.radio("colour", ["top_probs", "entropy", "kl_to_final", "target_probs"], horizontal=True,
                     key="lens_value")
    n = traj.n_layers
    text = [[show_token(t)[:8] for t in row] for row in traj.top_tokens]
    st.plotly_chart(heatmap(getattr(traj, value), [f"{i}:{show_token(t)}" for i, t in enumerate(traj.str_tokens)],
                            [str(i) if i < n else "output" for i in range(n + 1)], diverging=False, text=text,
                            title=f"{traj.lens_name}: top next token per layer (colour: {value})", xlabel="position",
                            ylabel="layer (resid_pre)", pair="layer {y}, {x}", height=max(380, 24 * (n + 1) + 160)),
                    key="lens_traj")

    st.subheader(f"Just before L{ctx.layer}H{ctx.head} writes")
    st.caption("head input = resid_pre[L]; before head = resid_pre[L] + attn_out[L] − this head's output; "
               "after head = resid_pre[L] + attn_out[L]; all decoded at lens layer L.")
    with st.spinner("decoding around the head"):
        hl: HeadLens = ctx.run(head_lens, ctx.prompt, ctx.layer, ctx.head, lens_path)
    labels = [f"{i}:{show_token(t)}" for i, t in enumerate(hl.str_tokens)]
    pos = st.selectbox("position", range(len(labels)), index=len(labels) - 1, format_func=lambda i: labels[i],
                       key="lens_pos")
    st.dataframe(pd.DataFrame({s: [f"{show_token(t)} ({p:.3f})" for t, p in hl.top[s][pos]] for s in STREAMS}),
                 key="lens_top")
    a, b = st.columns(2)
    a.markdown("**pushed up by the head** (Δ log-prob)")
    a.dataframe(pd.DataFrame([(show_token(t), v) for t, v in hl.pushed_up[pos]], columns=["token", "Δ"]),
                key="lens_up")
    b.markdown("**pushed down by the head** (Δ log-prob)")
    b.dataframe(pd.DataFrame([(show_token(t), v) for t, v in hl.pushed_down[pos]], columns=["token", "Δ"]),
                key="lens_down")
    probs = torch.stack([hl.target_prob[s] for s in STREAMS])
    st.plotly_chart(heatmap(probs, labels, list(STREAMS), diverging=False, title="probability of the actual next "
                            "token", hover="p=%{z:.3f}", height=300), key="lens_target")
