"""``fxlens.utils``: TransformerLens' ``utils`` names, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxlens import utils
from tests.explorer.tiny import char_tokenizer, tiny_model


def test_to_numpy_get_device_remove_batch_dim():
    x = torch.arange(6, dtype=torch.bfloat16).reshape(1, 2, 3).requires_grad_()
    a = utils.to_numpy(x)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.tolist() == [[[0, 1, 2], [3, 4, 5]]]
    assert utils.to_numpy([1, 2]).tolist() == [1, 2] and utils.to_numpy(3).item() == 3
    with pytest.raises(ValueError, match="invalid type"):
        utils.to_numpy(object())
    assert utils.get_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert utils.remove_batch_dim(x).shape == (2, 3) and utils.remove_batch_dim(x[0]).shape == (2, 3)
    assert utils.get_corner(torch.arange(16).reshape(4, 4), 2).tolist() == [[0, 1], [4, 5]]


def test_slice_modes():
    x = torch.arange(10)
    assert utils.Slice(None).apply(x).tolist() == x.tolist()
    assert utils.Slice(-1).apply(x).item() == 9 and utils.Slice(-1).mode == "int"
    assert utils.Slice((3,)).apply(x).tolist() == [0, 1, 2]
    assert utils.Slice((2, 5)).apply(x).tolist() == [2, 3, 4]
    assert utils.Slice((1, 8, 3)).apply(x).tolist() == [1, 4, 7]
    assert utils.Slice([1, 4]).apply(x).tolist() == [1, 4]
    assert utils.Slice(torch.tensor([0, 2])).apply(x).tolist() == [0, 2]
    assert utils.Slice(np.int64(3)).mode == "int"
    assert utils.Slice.unwrap(3).apply(x).tolist() == [3]
    assert utils.Slice((2, 5)).indices(10).tolist() == [2, 3, 4]
    y = torch.arange(12).reshape(3, 4)
    assert utils.Slice(-1).apply(y, dim=-1).tolist() == [3, 7, 11]


def test_lm_cross_entropy_loss_and_accuracy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    toks = torch.randint(0, 11, (2, 5), generator=g)
    per = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), toks[:, 1:].reshape(-1),
                                            reduction="none").reshape(2, 4)
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, toks, per_token=True), per)
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, toks), per.mean())
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, toks, mask), per[keep].mean())
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, toks, mask, per_token=True), per * keep)
    acc = (logits.argmax(-1)[:, :-1] == toks[:, 1:])
    assert torch.equal(utils.lm_accuracy(logits, toks, per_token=True), acc)
    torch.testing.assert_close(utils.lm_accuracy(logits, toks), acc.float().mean())


def test_tokenize_and_concatenate_on_a_list():
    tok = char_tokenizer()
    docs = ["abc", "defgh", "ij"]
    rows = utils.tokenize_and_concatenate(docs, tok, max_length=4)
    stream = sum(([*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id] for d in docs), [])[:-1]
    assert rows.shape == (len(stream) // 3, 4)
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == stream[: rows.shape[0] * 3]
    no_bos = utils.tokenize_and_concatenate([{"text": d} for d in docs], tok, max_length=4, add_bos_token=False)
    assert no_bos.reshape(-1).tolist() == stream[: len(stream) // 4 * 4]
    short = utils.tokenize_and_concatenate(["a"], tok, max_length=4)  # padded to one row
    assert short.tolist() == [[tok.bos_token_id, *tok("a", add_special_tokens=False)["input_ids"],
                               tok.pad_token_id, tok.pad_token_id]]


def test_tokenize_and_concatenate_on_a_dataset():
    datasets = pytest.importorskip("datasets")
    tok = char_tokenizer()
    docs = ["abc", "defgh", "ij"]
    ds = datasets.Dataset.from_dict({"text": docs, "other": [1, 2, 3]})
    out = utils.tokenize_and_concatenate(ds, tok, max_length=4, num_proc=None)
    assert out.column_names == ["tokens"]
    assert torch.equal(torch.stack(list(out["tokens"])), utils.tokenize_and_concatenate(docs, tok, max_length=4))


def test_test_prompt_prints_tl_report(capsys):
    m = tiny_model("llama")
    utils.test_prompt("abca", "b", m, prepend_space_to_answer=False, top_k=3)
    out = capsys.readouterr().out.splitlines()
    ids = torch.cat([m.to_tokens("abca"), m.to_tokens("b", prepend_bos=False)], dim=1)
    with torch.no_grad():
        logits = m.hf_model(ids).logits[0, -2]
    probs = logits.softmax(-1)
    b = m.to_single_token("b")
    rank = int((probs > probs[b]).sum())
    assert out[0] == f"Tokenized prompt: {m.to_str_tokens('abca')}"
    assert out[1] == "Tokenized answer: ['b']"
    assert out[2] == "Performance on answer token:"
    assert out[3] == f"Rank: {rank: <8} Logit: {logits[b].item():5.2f} Prob: {probs[b].item():6.2%} Token: |b|"
    top = probs.argsort(descending=True)[0]
    assert out[4] == (f"Top 0th token. Logit: {logits[top].item():5.2f} Prob: {probs[top].item():6.2%} "
                      f"Token: |{m.to_string(top)}|")
    assert out[-1] == f"Ranks of the answer tokens: [('b', {rank})]"
    utils.test_prompt("abca", ["b", "c"], m, prepend_space_to_answer=False, print_details=False)
    assert capsys.readouterr().out.strip().startswith("Ranks of the answer tokens: [[('b',")


@pytest.mark.slow
def test_analysis_and_utils_equal_transformer_lens_own_code():
    """tests/compat/tl_reference.py in a venv with transformer-lens 4.3 (``.venv-tl``): TL's ActivationCache and
    utils on the very tensors of fxlens caches (4 families, with and without batch dim) agree with fxlens'."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    py = root / ".venv-tl" / "bin" / "python"
    if not py.exists():
        pytest.skip("no .venv-tl: python -m venv .venv-tl; pip install torch==2.13.0 transformer-lens==4.3.0 pytest; "
                    "pip install -e .")
    out = subprocess.run([str(py), "-m", "tests.compat.tl_reference"], cwd=root, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().endswith("0 mismatches")
