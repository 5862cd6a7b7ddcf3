"""TransformerLens' tokenisation keywords, checked against the HF tokenizer's own output and TL's BOS rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import processors

from fxlens.tokens import TokenMixin
from tests.explorer.tiny import char_tokenizer, tiny_model


class Toks(TokenMixin):
    """The mixin alone, over a tokenizer (no model needed)."""

    class cfg:
        n_ctx = 8

    device = torch.device("cpu")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def no_bos_tokenizer():
    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    return tok


def chars(text: str) -> list[int]:
    return no_bos_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_prepend_bos_follows_tl_rule(adds_bos):
    tok = char_tokenizer() if adds_bos else no_bos_tokenizer()
    m = Toks(tok)
    bos = tok.bos_token_id
    body = chars("ab")
    assert m.to_tokens("ab").tolist() == [tok("ab")["input_ids"]]  # None: the tokenizer's own behaviour
    assert m.to_tokens("ab", prepend_bos=True).tolist() == [[bos, *body]]  # never doubled
    assert m.to_tokens("ab", prepend_bos=False).tolist() == [body]
    m.default_prepend_bos = True
    assert m.to_tokens("ab").tolist() == [[bos, *body]]
    assert m.to_tokens("ab", prepend_bos=False).tolist() == [body]
    m.default_prepend_bos = False
    assert m.to_tokens("ab").tolist() == [body]
    assert m.to_tokens("ab", prepend_bos=True).tolist() == [[bos, *body]]


def test_padding_side_and_mask():
    tok = no_bos_tokenizer()
    m = Toks(tok)
    pad = tok.pad_token_id
    a, abc = chars("a"), chars("abc")
    ids, mask = m.to_tokens_and_mask(["a", "abc"], padding_side="left")
    assert ids.tolist() == [[pad, pad, *a], abc] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert m.to_tokens(["a", "abc"]).tolist() == [[*a, pad, pad], abc]  # the tokenizer's side (right)
    m.default_padding_side = "left"
    assert m.to_tokens(["a", "abc"]).tolist() == [[pad, pad, *a], abc]
    assert m.to_tokens(["a", "abc"], padding_side="right").tolist() == [[*a, pad, pad], abc]
    with pytest.raises(ValueError, match="padding_side"):
        m.to_tokens(["a"], padding_side="middle")


def test_truncate_and_move_to_device():
    m = Toks(char_tokenizer())
    text = "abcdefghijkl"
    full = char_tokenizer()(text)["input_ids"]
    assert m.to_tokens(text).tolist() == [full[:8]]  # truncate=True by default, as TL
    assert m.to_tokens(text, truncate=False).tolist() == [full]
    assert m.to_tokens(text, move_to_device=False).device.type == "cpu"
    ids, _ = m.to_tokens_and_mask(text)  # the forward's path keeps everything: it raises on over-long input
    assert ids.shape[1] == len(full)


def test_tokenize_keeps_no_state():
    m = Toks(char_tokenizer())
    before = dict(vars(m))
    m._tokenize(["a", "bcd"])
    m.to_tokens(["a", "bcd"])
    assert vars(m) == before and not hasattr(m, "last_attention_mask")


def test_string_conversions():
    tok = no_bos_tokenizer()
    m = Toks(tok)
    ab = chars("ab")
    assert m.to_string(ab[0]) == "a"
    assert m.to_string(ab) == m.to_string(np.array(ab)) == m.to_string(torch.tensor(ab)) == "ab"
    assert m.to_string(torch.tensor([ab, ab])) == ["ab", "ab"]
    assert m.to_single_str_token(ab[1]) == "b"
    with pytest.raises(TypeError):
        m.to_single_str_token("b")
    assert m.to_single_token("b") == ab[1]
    with pytest.raises(ValueError, match="not one"):
        m.to_single_token("bb")
    assert m.to_str_tokens("ab") == ["a", "b"]
    assert m.to_str_tokens(["ab", "c"]) == [["a", "b"], ["c"]]
    assert m.to_str_tokens(torch.tensor([ab])) == m.to_str_tokens(np.array(ab)) == ["a", "b"]
    assert m.to_str_tokens([torch.tensor(ab), "c"]) == [["a", "b"], ["c"]]
    assert m.to_str_tokens("ab", prepend_bos=True) == ["<s>", "a", "b"]
    with pytest.raises(ValueError, match="one sequence"):
        m.to_str_tokens(torch.tensor([ab, ab]))


def test_get_token_position():
    m = Toks(no_bos_tokenizer())
    assert m.get_token_position("b", "abcb") == 1
    assert m.get_token_position("b", "abcb", mode="last") == 3
    assert m.get_token_position("b", "abcb", prepend_bos=True) == 2
    m.default_prepend_bos = True
    assert m.get_token_position("b", "abcb") == 2
    ids = m.to_tokens("abcb")
    assert m.get_token_position(int(ids[0, 2]), ids) == 2
    assert m.get_token_position(ids[0, 2], ids[0]) == 2
    with pytest.raises(ValueError, match="does not occur"):
        m.get_token_position("z", "abcb")


def test_forward_text_follows_default_prepend_bos():
    """A string forward equals the forward of the ids to_tokens gives, for both BOS settings."""
    m = tiny_model("llama")
    try:
        for bos in (False, True):
            m.default_prepend_bos = bos
            ids = m.to_tokens("hello")
            assert ids[0, 0].item() == 1 if bos else ids[0, 0].item() != 1
            torch.testing.assert_close(m("hello"), m(ids))
    finally:
        m.default_prepend_bos = None
