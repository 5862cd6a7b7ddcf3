"""``return_type="loss"``: never a silent NaN; masks count the (token, next token) pairs TransformerLens counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxlens.loss import lm_loss
from tests.conftest import tokens, traced


def _reference(logits, ids, pairs):
    """Mean of F.cross_entropy over the explicitly listed (row, position) pairs."""
    rows = [F.cross_entropy(logits[b, p].float()[None], ids[b, p + 1][None]) for b, p in pairs]
    return torch.stack(rows).mean()


def test_one_token_input_raises():
    m = traced("llama")
    with pytest.raises(ValueError, match="the loss needs at least 2 tokens per sequence .* got 1"):
        m(tokens(2, 1), return_type="loss")


def test_one_token_input_raises_for_both():
    m = traced("gpt2")
    with pytest.raises(ValueError, match="at least 2 tokens .*return_type='logits'"):
        m(tokens(1, 1), return_type="both")


def test_all_zero_mask_raises():
    logits, ids = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    with pytest.raises(ValueError, match="leaves no \\(token, next token\\) pair unmasked"):
        lm_loss(logits, ids, torch.zeros(2, 5, dtype=torch.long))


def test_mask_without_adjacent_pair_raises():
    logits, ids = torch.randn(1, 5, 11), torch.randint(0, 11, (1, 5))
    with pytest.raises(ValueError, match="loss is undefined: check the mask"):
        lm_loss(logits, ids, torch.tensor([[1, 0, 1, 0, 1]]))


def test_left_padding_skips_the_prediction_made_at_padding():
    """TransformerLens' rule: a pair counts when both tokens are real (the pad -> first token pair does not)."""
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pairs = [(0, 2), (0, 3)] + [(1, p) for p in range(4)]
    torch.testing.assert_close(lm_loss(logits, ids, mask), _reference(logits, ids, pairs))


def test_right_padding_pairs():
    g = torch.Generator().manual_seed(1)
    logits, ids = torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(lm_loss(logits, ids, mask), _reference(logits, ids, [(0, 0), (1, 0), (1, 1), (1, 2)]))


def test_model_loss_equals_cross_entropy_of_its_logits():
    m = traced("llama")
    ids = tokens(2, 6)
    logits = m(ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(m(ids, return_type="loss"), ref)
