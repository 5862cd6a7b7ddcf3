"""A tiny random Llama with a character-level tokenizer: the explorer needs text in and tokens out."""

from __future__ import annotations

import string

import fxlens
from tests.conftest import VOCAB, tiny_hf

_CHARS = string.printable[:95] + "\n"  # printable ASCII, then newline; ids 4..99


def char_tokenizer():
    """A fast HF tokenizer with one token per character (pad 0, bos 1, eos 2, unk 3), BOS prepended."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(_CHARS)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


_MODELS: dict[str, fxlens.HookedModel] = {}


def tiny_model(family: str = "llama") -> fxlens.HookedModel:
    """The session's tiny traced ``family`` model with the character tokenizer."""
    if family not in _MODELS:
        _MODELS[family] = fxlens.trace(tiny_hf(family), char_tokenizer(), graph_cache=False)
    return _MODELS[family]
