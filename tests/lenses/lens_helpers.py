"""Tiny causal LMs with a real (trained, byte-level BPE) tokenizer, saved to a folder, for lens tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers

WORDS = ("the a man woman house garden letter sister walked wrote read saw said quickly slowly "
         "happy anxious elegant morning evening carriage ball dance Emma Anne Elliot Bath").split()


def write_corpus(folder: Path, n_files: int = 3, words: int = 1500, seed: int = 0) -> list[Path]:
    """A few .txt files of patterned pseudo-prose (learnable bigrams, so lenses have signal)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for f in range(n_files):
        out, w = [], rng.choice(WORDS)
        for _ in range(words):
            out.append(w)
            w = WORDS[(WORDS.index(w) * 7 + rng.choice((1, 1, 2, 3))) % len(WORDS)]
            if rng.random() < 0.08:
                out[-1] += "."
        path = folder / f"part{f}.txt"
        path.write_text(" ".join(out) + "\n")
        files.append(path)
    return files


def tiny_lm_dir(folder: Path, texts: list[Path], seed: int = 0) -> Path:
    """Save a tiny random Llama + a BPE tokenizer trained on ``texts`` to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(t) for t in texts], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                   eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id,
                                   bos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
