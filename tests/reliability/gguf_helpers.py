"""A tiny Llama GGUF file (random fp32 weights, a 64-token vocabulary) and ways to break it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, n_layers: int = 2, d: int = 32, ff: int = 64, heads: int = 4, kv: int = 2,
                    vocab: int = 64, seed: int = 0) -> Path:
    """Write a loadable Llama GGUF (with a llama tokenizer) of ~100 KB to ``path``."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(10000.0)
    toks = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(vocab - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    hd = d // heads
    w.add_tensor("token_embd.weight", rand(vocab, d))
    w.add_tensor("output_norm.weight", 1 + rand(d))
    w.add_tensor("output.weight", rand(vocab, d))
    for i in range(n_layers):
        p = f"blk.{i}."
        for name, shape in (("attn_norm", (d,)), ("ffn_norm", (d,))):
            w.add_tensor(p + name + ".weight", 1 + rand(*shape))
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)),
                            ("ffn_down", (d, ff))):
            w.add_tensor(p + name + ".weight", rand(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def overwrite_tensor(path: Path, name: str, byte: int = 0xFF, n: int | None = None) -> None:
    """Overwrite the first ``n`` bytes (all by default) of tensor ``name``'s data with ``byte``.

    ``0xFF`` bytes make fp32 NaNs, as a disk or download error in the data region would.
    """
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    start, size = int(t.data_offset), int(t.n_bytes)
    data = bytearray(path.read_bytes())
    data[start:start + (size if n is None else n)] = bytes([byte]) * (size if n is None else n)
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])
