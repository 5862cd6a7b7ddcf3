"""The language-model loss behind ``return_type="loss"``: mean next-token cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None,
            per_token: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over ``[batch, pos]`` token ids and ``[batch, pos, vocab]`` logits;
    with ``per_token``, the unreduced ``[batch, pos - 1]`` losses (TL's ``loss_per_token``; 0 where the
    token or the next one is padding).

    As TransformerLens' ``lm_cross_entropy_loss``: with a mask, a prediction counts only when both
    its position and the next token are unmasked (a padding position's prediction is skipped too).
    Where TransformerLens returns NaN (one token, or a mask leaving no pair), this raises ``ValueError``.
    """
    if logits.shape[1] < 2:
        raise ValueError(f"the loss needs at least 2 tokens per sequence (each token predicts the next), got "
                         f"{logits.shape[1]}: give a longer input, or use return_type='logits'")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    pairs = None if mask is None else (mask[:, :-1].bool() & mask[:, 1:].bool()).to(nll.dtype)
    if per_token:  # TL: pairs touching padding are 0
        return nll if pairs is None else nll * pairs
    if pairs is None:
        return nll.mean()
    n = pairs.sum()
    if n == 0:
        raise ValueError("the attention mask leaves no (token, next token) pair unmasked, so the loss is "
                         "undefined: check the mask (1 = real token) or use return_type='logits'")
    return (nll * pairs).sum() / n


__all__ = ["lm_loss"]
