"""Small evals from the TransformerLens Main Demo: induction loss and per-head attention scores.

Repeated random tokens ``[BOS] t_1..t_n t_1..t_n``: a model with induction heads predicts
the second half far better than the first. Head scores average ``hook_pattern`` entries:

* induction: query ``i`` in the second half attends to ``i - n + 1`` (the token after the
  previous occurrence of the current token);
* duplicate token: query ``i`` attends to ``i - n`` (the previous occurrence);
* previous token: query ``i`` attends to ``i - 1``.

TransformerLens' own evals keep their signatures and numbers: :func:`induction_loss` (a scalar; the
per-position fxlens version is :func:`per_token_induction_loss`), :func:`sanity_check`,
:func:`evaluate_on_dataset`.
"""

from __future__ import annotations

import torch

from ..utils import lm_cross_entropy_loss


def repeated_tokens(model, batch: int = 4, seq_len: int = 50, seed: int = 0,
                    vocab_range: tuple[int, int] | None = None, prepend_bos: bool = True) -> torch.Tensor:
    """``[batch, bos + 2 * seq_len]`` random tokens repeated once (BOS first when the tokenizer has one).

    ``vocab_range`` defaults to ``[min(1000, d_vocab // 2), min(10000, d_vocab))``, clear of special tokens.
    """
    v = model.cfg.d_vocab
    lo, hi = vocab_range or (min(1000, v // 2), min(10000, v))
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(lo, hi, (batch, seq_len), generator=g)
    parts = [half, half]
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    if prepend_bos and bos is not None:
        parts.insert(0, torch.full((batch, 1), bos, dtype=torch.long))
    return torch.cat(parts, dim=1).to(model.device)


def _has_bos(model, tokens: torch.Tensor, seq_len: int) -> int:
    extra = tokens.shape[1] - 2 * seq_len
    if extra not in (0, 1):
        raise ValueError(f"expected [batch, 2 * seq_len (+1 BOS)] tokens; got {tuple(tokens.shape)} for "
                         f"seq_len={seq_len}")
    return extra


def per_token_induction_loss(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> torch.Tensor:
    """Per-position next-token loss on repeated tokens: ``[batch, pos - 1]``.

    ``loss[:, -seq_len + 1:]`` is the predictable (second) half; pass ``tokens`` from
    :func:`repeated_tokens` or let ``kw`` (``batch``, ``seed``, ...) make them.
    """
    tokens = repeated_tokens(model, seq_len=seq_len, **kw) if tokens is None else tokens
    logits = model(tokens)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def mean_induction_loss(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> tuple[float, float]:
    """``(first-half loss, second-half loss)`` on repeated tokens (second half excludes its first token)."""
    tokens = repeated_tokens(model, seq_len=seq_len, **kw) if tokens is None else tokens
    loss = per_token_induction_loss(model, tokens, seq_len)
    bos = _has_bos(model, tokens, seq_len)
    first = loss[:, bos:bos + seq_len - 1]
    second = loss[:, -(seq_len - 1):]
    return first.mean().item(), second.mean().item()


def _stripe(patterns: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean of ``patterns[..., q_i, k_i]`` over ``i`` and batch: ``[n_layers, n_heads]``."""
    return patterns[..., q, k].mean(dim=(1, -1))


def _patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[n] for n in names])  # [L, batch, H, q, k]


def head_scores(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> dict[str, torch.Tensor]:
    """``{"induction", "duplicate", "previous"}`` scores, each ``[n_layers, n_heads]``, from one forward."""
    tokens = repeated_tokens(model, seq_len=seq_len, **kw) if tokens is None else tokens
    bos = _has_bos(model, tokens, seq_len)
    p = _patterns(model, tokens)
    second = torch.arange(bos + seq_len, tokens.shape[1], device=p.device)
    allq = torch.arange(1, tokens.shape[1], device=p.device)
    return {"induction": _stripe(p, second, second - seq_len + 1),
            "duplicate": _stripe(p, second, second - seq_len),
            "previous": _stripe(p, allq, allq - 1)}


def induction_scores(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> torch.Tensor:
    """``[n_layers, n_heads]`` mean attention from the second half to the token after the previous occurrence."""
    return head_scores(model, tokens, seq_len, **kw)["induction"]


def previous_token_scores(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> torch.Tensor:
    """``[n_layers, n_heads]`` mean attention to the previous position."""
    return head_scores(model, tokens, seq_len, **kw)["previous"]


# -- TransformerLens' evals, same signatures -----------------------------------------------------------------
SANITY_TEXT = ("Many important transition points in the history of science have been moments when science "
               "'zoomed in.' At these points, we develop a visualization or tool that allows us to see the world in a "
               "new level of detail, and a new field of science develops to study the world through this lens.")


def _default_bos(model, prepend_bos: bool | None) -> bool:
    """TL's rule: an explicit value, else the model's ``default_prepend_bos``, else ``True``."""
    for value in (prepend_bos, getattr(model.cfg, "default_prepend_bos", None),
                  getattr(model, "default_prepend_bos", None)):
        if value is not None:
            return bool(value)
    return True


@torch.inference_mode()
def induction_loss(model, tokenizer=None, batch_size: int = 4, subseq_len: int = 384, prepend_bos: bool | None = None,
                   device=None) -> torch.Tensor:
    """TransformerLens' induction loss: the mean next-token loss on the second half of random tokens repeated
    twice (positions ``subseq_len + 1 ..``), a scalar.

    As TL: tokens from the global torch RNG, ``torch.randint(100, 20000, (batch_size, subseq_len))``
    (the range clamped below ``d_vocab`` for smaller vocabularies), the first token replaced by BOS
    when ``prepend_bos`` (default: the model's ``default_prepend_bos``, else ``True``).
    ``device`` defaults to the model's.
    """
    hi = min(20000, model.cfg.d_vocab)
    first_half = torch.randint(min(100, hi - 1), hi, (batch_size, subseq_len)).to(device or model.device)
    repeated = first_half.repeat(1, 2)
    if _default_bos(model, prepend_bos):
        tok = tokenizer if tokenizer is not None else model.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise ValueError("induction_loss with prepend_bos needs a tokenizer with a BOS token: pass tokenizer= "
                             "or prepend_bos=False")
        repeated[:, 0] = bos
    logits = model(repeated, return_type="logits")
    return lm_cross_entropy_loss(logits, repeated, per_token=True)[:, subseq_len + 1:].mean()


def sanity_check(model) -> torch.Tensor:
    """TL's quick check: the loss on the first paragraph of *Circuits: Zoom In* (< 5 fine, > 7 broken)."""
    return model(SANITY_TEXT, return_type="loss")


@torch.inference_mode()
def evaluate_on_dataset(model, data_loader, truncate: int = 100, device=None) -> float:
    """Mean loss over the ``{"tokens": ...}`` batches of ``data_loader`` (the first ``truncate + 1``), as TL."""
    running, total = 0.0, 0
    for batch in data_loader:
        running += model(batch["tokens"].to(device or model.device), return_type="loss").mean().item()
        total += 1
        if total > truncate:
            break
    return running / total


__all__ = ["repeated_tokens", "per_token_induction_loss", "mean_induction_loss", "head_scores", "induction_scores",
           "previous_token_scores", "induction_loss", "sanity_check", "evaluate_on_dataset"]
