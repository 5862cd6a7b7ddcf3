"""Induction evals against hand computation from the cached patterns."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions import evals as E
from tests.conftest import tokens, traced


def test_repeated_tokens_and_loss():
    m = traced("llama")
    toks = E.repeated_tokens(m, batch=3, seq_len=8, seed=1)
    assert toks.shape == (3, 16)  # the tiny test models have no tokenizer: no BOS
    assert torch.equal(toks[:, :8], toks[:, 8:])
    loss = E.per_token_induction_loss(m, toks, seq_len=8)
    logits = m(toks)
    by_hand = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:], reduction="none")
    torch.testing.assert_close(loss[0], by_hand, atol=1e-5, rtol=1e-5)
    first, second = E.mean_induction_loss(m, toks, seq_len=8)
    torch.testing.assert_close(torch.tensor(second), loss[:, -7:].mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(first), loss[:, :7].mean(), atol=1e-6, rtol=1e-6)


def test_head_scores_match_a_loop_over_the_pattern():
    m = traced("gpt2")
    n = 6
    toks = E.repeated_tokens(m, batch=2, seq_len=n, seed=3)
    scores = E.head_scores(m, toks, seq_len=n)
    _, cache = m.run_with_cache(toks, names_filter=lambda x: x.endswith("hook_pattern"))
    for L in range(m.cfg.n_layers):
        p = cache["pattern", L]
        for h in range(m.cfg.n_heads):
            ind = sum(p[b, h, q, q - n + 1] for b in range(2) for q in range(n, 2 * n)) / (2 * n)
            prev = sum(p[b, h, q, q - 1] for b in range(2) for q in range(1, 2 * n)) / (2 * (2 * n - 1))
            dup = sum(p[b, h, q, q - n] for b in range(2) for q in range(n, 2 * n)) / (2 * n)
            assert abs(scores["induction"][L, h] - ind) < 1e-6
            assert abs(scores["previous"][L, h] - prev) < 1e-6
            assert abs(scores["duplicate"][L, h] - dup) < 1e-6
    assert E.induction_scores(m, toks, seq_len=n).shape == (m.cfg.n_layers, m.cfg.n_heads)


def test_tl_induction_loss_is_the_second_half_mean():
    """TL's recipe by hand: global-RNG tokens repeated, BOS over the first, loss from the HF model's logits."""
    from tests.explorer.tiny import tiny_model

    m = tiny_model("llama")
    torch.manual_seed(3)
    got = E.induction_loss(m, batch_size=2, subseq_len=10)
    torch.manual_seed(3)
    half = torch.randint(100, m.cfg.d_vocab, (2, 10))
    toks = torch.cat([half, half], dim=1)
    toks[:, 0] = m.tokenizer.bos_token_id
    with torch.no_grad():
        logits = m.hf_model(toks).logits
    per = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")
    torch.testing.assert_close(got, per[:, 11:].mean(), atol=1e-5, rtol=1e-5)
    assert got.shape == ()
    torch.manual_seed(3)
    no_bos = E.induction_loss(m, batch_size=2, subseq_len=10, prepend_bos=False)
    assert not torch.isclose(no_bos, got)
    with pytest.raises(ValueError, match="BOS"):
        E.induction_loss(traced("llama"), batch_size=1, subseq_len=4)  # no tokenizer, prepend_bos defaults True
    assert E.induction_loss(traced("llama"), batch_size=1, subseq_len=4, prepend_bos=False).shape == ()


def test_sanity_check_and_evaluate_on_dataset():
    from tests.explorer.tiny import tiny_model

    m = tiny_model("llama")
    ids = m.to_tokens(E.SANITY_TEXT, truncate=False)
    if ids.shape[1] > m.cfg.n_ctx:
        with pytest.raises(ValueError, match="context"):
            E.sanity_check(m)
    batches = [{"tokens": tokens(2, 6, seed=s)} for s in range(3)]
    want = sum(m(b["tokens"], return_type="loss").item() for b in batches[:2]) / 2
    assert abs(E.evaluate_on_dataset(m, batches, truncate=1) - want) < 1e-6
