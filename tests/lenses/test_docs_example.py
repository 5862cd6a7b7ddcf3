"""The code example of docs/lenses.md runs as written, on a tiny model and corpus instead of SmolLM2 / Austen."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fxlens.lenses import LensEval, PredictionTrajectory, TunedLens
from tests.lenses.lens_helpers import tiny_lm_dir, write_corpus

DOC = Path(__file__).parents[2] / "docs" / "lenses.md"


def test_lenses_doc_example_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    texts = write_corpus(tmp_path / "text")
    held = write_corpus(tmp_path / "held", n_files=1, words=600, seed=5)[0]
    model_dir = tiny_lm_dir(tmp_path / "model", texts)
    subs = {'fxlens.offline_model_path("smollm2")': repr(str(model_dir)),
            '"austen:train"': repr(str(tmp_path / "text")),
            '"austen:eval"': repr(str(held)), "seq_len=128": "seq_len=16", ", 128,": ", 16,",
            "tuned(stream[10], 10)": "tuned(stream[2], 2)"}  # the tiny model has 3 layers
    for old, new in subs.items():
        assert old in block, f"docs/lenses.md example changed: {old!r} not found"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the example writes lens/
    scope: dict = {}
    exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    assert isinstance(scope["tuned"], TunedLens) and (tmp_path / "lens" / "params.safetensors").exists()
    assert scope["layer10"].shape == scope["logits"].shape  # [batch, pos, d_vocab]
    ev, traj = scope["ev"], scope["traj"]
    assert isinstance(ev, LensEval) and set(ev.metrics) == {"logit lens", "tuned lens"}
    assert isinstance(traj, PredictionTrajectory)
    assert torch.isfinite(scope["logits"]).all()
