"""Bad inputs and arguments get an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import VOCAB, tokens, traced

SITE = "blocks.0.hook_resid_post"


@pytest.mark.parametrize(("value", "exc", "words"), [
    (5, TypeError, "names_filter must be a site name, a list of names or a predicate"),
    (b"blocks.0.hook_resid_post", TypeError, "names_filter must be"),
    ([1, 2], TypeError, "site names must be strings"),
    (["blocks.0.hook_resid_postt"], KeyError, "closest"),
])
def test_bad_names_filter(value, exc, words):
    with pytest.raises(exc, match=words):
        traced("llama").run_with_cache(tokens(1, 4), names_filter=value)


@pytest.mark.parametrize(("hooks", "exc", "words"), [
    ([(3, lambda x, hook: x)], TypeError, "a hook's name must be a site name or a predicate"),
    ([(SITE, 3)], TypeError, "must be callable"),
    ([SITE], TypeError, r"must be a \(name or predicate, fn\) pair"),
    (SITE, TypeError, "must be a list of"),
])
def test_bad_fwd_hooks(hooks, exc, words):
    m = traced("llama")
    with pytest.raises(exc, match=words):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=hooks)
    assert m.active_hooks() == []


@pytest.mark.parametrize(("value", "exc", "words"), [
    (None, TypeError, "input is None"),
    (b"hello", TypeError, "input is bytes"),
    (torch.tensor([[1, VOCAB + 3]]), ValueError, f"token id {VOCAB + 3} is outside this model's vocabulary"),
    (torch.tensor([[-1, 4]]), ValueError, "token id -1 is outside"),
    (torch.randn(1, 4), TypeError, "token ids must be integers"),
    ([[1, 2], [3]], TypeError, "equal-length lists of ints"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty or malformed input"),
    (3.5, TypeError, "input must be a string"),
])
def test_bad_inputs(value, exc, words):
    with pytest.raises(exc, match=words):
        traced("llama")(value)


def test_lists_of_lists_of_ints_are_token_ids():
    m = traced("llama")
    ids = tokens(2, 5)
    assert torch.equal(m(ids.tolist()), m(ids))


@pytest.mark.parametrize(("mask", "exc", "words"), [
    (torch.ones(1, 3, dtype=torch.long), ValueError, "attention_mask has shape"),
    ("ones", TypeError, "attention_mask must be a tensor"),
    (torch.full((1, 5), 0.5), ValueError, "0/1 values"),
])
def test_bad_masks(mask, exc, words):
    with pytest.raises(exc, match=words):
        traced("llama")(tokens(1, 5), attention_mask=mask)


def test_mask_given_as_a_list_is_used():
    m = traced("llama")
    ids = tokens(1, 5)
    mask = [[0, 1, 1, 1, 1]]
    torch.testing.assert_close(m(ids, attention_mask=mask), m(ids, attention_mask=torch.tensor(mask)))


def test_hook_returning_a_meta_or_wrong_dtype_tensor_is_named():
    m = traced("llama")
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[(SITE, lambda x, hook: torch.empty_like(x, device="meta"))])
    with pytest.raises(ValueError, match="dtype torch.float32"):
        m.run_with_hooks(tokens(1, 4), fwd_hooks=[(SITE, lambda x, hook: x.double())])


@pytest.mark.parametrize("stop", [99, -99, 1.5, True])
def test_bad_stop_at_layer(stop):
    with pytest.raises(ValueError, match="stop_at_layer must be an int"):
        traced("llama")(tokens(1, 4), stop_at_layer=stop)


def test_unknown_forward_keywords_are_refused_not_dropped():
    with pytest.raises(TypeError, match="unsupported keyword"):
        traced("llama")(tokens(1, 4), past_kv_cache=None)


def test_loss_of_one_token_or_an_empty_mask_is_an_error_not_nan():
    m = traced("llama")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        m(tokens(1, 1), return_type="loss")
    with pytest.raises(ValueError, match=r"leaves no \(token, next token\) pair"):
        m(tokens(1, 4), return_type="loss", attention_mask=torch.tensor([[1, 0, 0, 0]]))


def test_text_inputs_never_reuse_another_calls_mask():
    m = traced("gpt2")
    ids = tokens(2, 5)
    padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with_mask = m(ids, attention_mask=padded)
    plain = m(ids)  # token ids without a mask: all ones, whatever came before
    torch.testing.assert_close(plain, m(ids, attention_mask=torch.ones_like(ids)))
    assert (with_mask - plain).abs().max() > 1e-4


def test_left_padded_gpt2_rows_equal_their_unpadded_runs():
    m = traced("gpt2")
    ids = tokens(1, 5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    alone = m(ids)
    got = m(padded, attention_mask=mask)[:, 3:]
    assert (got - alone).abs().max().item() <= 1e-5
    # unpadded input is still exactly HF's forward
    with torch.no_grad():
        ref = m.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (alone - ref).abs().max().item() == 0
