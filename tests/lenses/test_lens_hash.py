"""tuned-lens interop: configs carry tuned-lens' own unembedding hash, so neither side warns falsely."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np

from fxlens.lenses import TunedLens, load_lens
from tests.conftest import traced


def _tuned_lens_hash(m) -> str:
    """tuned-lens' ``tensor_hash`` of its ``Unembed.unembedding.weight``, written out here."""
    w = m.hf_model.get_output_embeddings().weight.detach().float().numpy()
    return hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()


def test_saved_configs_carry_tuned_lens_hash_and_load_silently(tmp_path):
    m = traced("llama")
    lens = TunedLens.from_model(m)
    assert lens.config.unembed_hash == _tuned_lens_hash(m)
    for fmt in ("fxlens", "tuned-lens"):
        lens.save(tmp_path / fmt, format=fmt)
        assert json.loads((tmp_path / fmt / "config.json").read_text())["unembed_hash"] == _tuned_lens_hash(m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_lens(m, tmp_path / fmt)


def test_older_fxlens_hash_still_matches_and_another_model_warns():
    m = traced("llama")
    lens = TunedLens.from_model(m)
    lens.config.unembed_hash = lens.unembed.legacy_hash()
    assert lens.unembedding_matches()
    lens.config.unembed_hash = _tuned_lens_hash(traced("qwen2"))
    assert not lens.unembedding_matches()
