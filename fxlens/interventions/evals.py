"""Small evals from the TransformerLens Main Demo: induction loss and per-head attention scores.

Repeated random tokens ``[BOS] t_1..t_n t_1..t_n``: a model with induction heads predicts
the second half far better than the first. Head scores average ``hook_pattern`` entries:

* induction: query ``i`` in the second half attends to ``i - n + 1`` (the token after the
  previous occurrence of the current token);
* duplicate token: query ``i`` attends to ``i - n`` (the previous occurrence);
* previous token: query ``i`` attends to ``i - 1``.
"""

from __future__ import annotations

import torch


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


def induction_loss(model, tokens: torch.Tensor | None = None, seq_len: int = 50, **kw) -> torch.Tensor:
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
    loss = induction_loss(model, tokens, seq_len)
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


__all__ = ["repeated_tokens", "induction_loss", "mean_induction_loss", "head_scores", "induction_scores",
           "previous_token_scores"]
