"""SAELens 6.54, unmodified, trains and evaluates an SAE on an fxlens model (slow; needs ``make sae-install``).

Runs ``docs/saelens_demo.py`` with ``.venv-sae``'s python (SAELens has its own dependency set, so it
lives in its own venv) on SmolLM2 with a tiny budget, then checks what it reports: SAELens' own
training loop stepped with finite losses, its ``run_evals`` ran (CE with / without the SAE), and the
SAE spliced in with an fxlens hook gives the same CE loss as with a PyTorch forward hook on the HF
decoder layer (clean CE likewise vs HF's own loss).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAE_PY = ROOT / ".venv-sae" / "bin" / "python"
STEPS = 12
PERF = "model_performance_preservation/"  # run_evals' CE metrics, as SAELens logs them


def _saelens_importable() -> bool:
    if not SAE_PY.exists():
        return False
    return subprocess.run([str(SAE_PY), "-c", "import sae_lens, fxlens"], cwd=ROOT, capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _saelens_importable(),
                       reason="needs .venv-sae with sae_lens and fxlens: run make sae-install"),
]


def test_saelens_trains_and_evaluates_on_fxlens(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [str(SAE_PY), "docs/saelens_demo.py", "--steps", str(STEPS), "--batch-tokens", "128", "--context", "32",
         "--d-sae", "1024", "--eval-tokens", "128", "--train-text", "README.md", "--eval-text", "docs/main_demo.md",
         "--json", str(out), "--out", str(tmp_path / "sae")],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    train = [e for e in r["logs"] if "losses/overall_loss" in e]
    evals = [e for e in r["logs"] if PERF + "ce_loss_with_sae" in e]
    assert train and all(math.isfinite(e["losses/overall_loss"]) for e in train)
    assert max(e["step"] for e in train) >= STEPS // 2
    assert evals, "SAELens' run_evals did not run"
    for e in evals:
        assert all(math.isfinite(e[PERF + k]) for k in ("ce_loss_with_sae", "ce_loss_without_sae",
                                                        "ce_loss_with_ablation"))
        assert e[PERF + "ce_loss_without_sae"] < e[PERF + "ce_loss_with_ablation"]
    ce = r["ce"]
    assert ce["ce_clean_fxlens"] == pytest.approx(ce["ce_clean_hf"], abs=1e-4)
    assert ce["ce_sae_fxlens"] == pytest.approx(ce["ce_sae_hf"], abs=1e-4)
    assert ce["ce_sae_fxlens"] != pytest.approx(ce["ce_clean_fxlens"], abs=1e-3)  # the SAE really was spliced in
