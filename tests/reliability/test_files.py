"""GGUF files and checkpoint folders that are broken: refused with the path, nothing wrong cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import fxlens
from tests.conftest import tiny_hf
from tests.reliability.gguf_helpers import overwrite_tensor, truncate, write_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXLENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf_path(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _converted(cache):
    return sorted(p.name for p in cache.glob("tiny-*")) if cache.exists() else []


def test_valid_gguf_loads_with_hf_logits(cache, gguf_path):
    """Control: the tiny GGUF loads and its logits equal HF's own GGUF loading."""
    m = fxlens.from_pretrained(gguf_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(m(ids), ref(ids).logits)
    assert len(_converted(cache)) == 1


def test_corrupted_gguf_is_refused_and_not_cached(cache, gguf_path):
    overwrite_tensor(gguf_path, "blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="dequantises to NaN/inf weights in 1 tensors") as e:
        fxlens.from_pretrained(gguf_path)
    assert str(gguf_path) in str(e.value) and "nothing was cached" in str(e.value)
    assert _converted(cache) == []


def test_corrupted_gguf_is_refused_again(cache, gguf_path):
    overwrite_tensor(gguf_path, "token_embd.weight", n=8)
    for _ in range(2):  # the second load finds no cached NaN model either
        with pytest.raises(ValueError, match="the file is corrupted; download it again"):
            fxlens.from_pretrained(gguf_path)


def test_inf_weight_in_gguf_is_refused(cache, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    inf = np.array([np.inf], dtype=np.float32).tobytes()  # 00 00 80 7f: overwrite one weight with +inf
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "output_norm.weight")
    data = bytearray(path.read_bytes())
    data[int(t.data_offset):int(t.data_offset) + 4] = inf
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="NaN/inf weights in 1 tensors \\(e.g. model.norm.weight\\)"):
        fxlens.from_pretrained(path)


def test_truncated_gguf(cache, gguf_path):
    size = gguf_path.stat().st_size
    truncate(gguf_path, size // 2)
    with pytest.raises(ValueError, match="is not a complete GGUF file .*truncated or corrupted") as e:
        fxlens.from_pretrained(gguf_path)
    assert str(gguf_path) in str(e.value) and f"{size // 2} bytes" in str(e.value)


def test_gguf_truncated_in_the_header(cache, gguf_path):
    truncate(gguf_path, 100)
    with pytest.raises(ValueError, match=r"tiny\.gguf is not a complete GGUF file \(100 bytes"):
        fxlens.from_pretrained(gguf_path)


def test_gguf_missing_its_last_bytes(cache, gguf_path):
    truncate(gguf_path, gguf_path.stat().st_size - 16)
    with pytest.raises(ValueError, match="is not a complete GGUF file"):
        fxlens.from_pretrained(gguf_path)


def test_empty_gguf(cache, gguf_path):
    gguf_path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"tiny\.gguf is empty \(0 bytes\), not a GGUF file: download it again"):
        fxlens.from_pretrained(gguf_path)


def test_text_file_named_gguf(cache, gguf_path):
    gguf_path.write_text("<html>404 Not Found</html>\n" * 10)
    with pytest.raises(ValueError, match="is not a complete GGUF file"):
        fxlens.from_pretrained(gguf_path)


def test_missing_gguf_file(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no such file: {tmp_path / 'absent.gguf'}"):
        fxlens.from_pretrained(tmp_path / "absent.gguf")


def test_nan_checkpoint_folder_is_refused(tmp_path):
    """A folder (e.g. a GGUF conversion cached by an older fxlens) whose weights hold NaN."""
    hf = tiny_hf("llama")
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    hf.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="holds NaN/inf weights in 1 tensors \\(e.g. model.layers.1.mlp.up_proj"):
        fxlens.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors_in_a_model_folder_names_the_file(tmp_path, keep):
    tiny_hf("llama").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{weights} cannot be read \\(SafetensorError: .*truncated or corrupted"):
        fxlens.from_pretrained(tmp_path / "m")
