"""Every TransformerLens-named site on SmolLM2 equals TransformerLens 4.3's own value (slow).

Runs ``benchmarks/tl_parity.py`` with the Python of an environment that has ``transformer-lens``
beside this fxlens: ``$FXLENS_TL_PYTHON``, else ``.venv-tl/bin/python`` in the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The TransformerLens names compared (issue 14): every one must be in both caches.
TL_SITES = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"} | {
    f"blocks.{{L}}.{s}" for s in (
        "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
        "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
        "hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre",
        "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")}


def _tl_python() -> str:
    py = os.environ.get("FXLENS_TL_PYTHON") or str(ROOT / ".venv-tl" / "bin" / "python")
    if not Path(py).exists():
        pytest.skip(f"no TransformerLens environment at {py}: create .venv-tl (torch==2.13.0 first, then "
                    "transformer-lens==4.3.0 and `pip install -e '.[offline]'`) or set FXLENS_TL_PYTHON")
    probe = subprocess.run([py, "-c", "import transformer_lens, fxlens"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode:
        pytest.skip(f"transformer_lens or fxlens is not importable with {py}: {probe.stderr.strip()[-300:]}")
    return py


@pytest.mark.slow
@pytest.mark.parametrize("processed", [False, True], ids=["plain", "tl-processed"])
def test_every_tl_site_equals_transformer_lens(tmp_path, processed):
    """Plain: fxlens.from_pretrained vs the bridge. TL-processed: HookedTransformer.from_pretrained (fold_ln,
    centring, fold_value_biases) vs the bridge's enable_compatibility_mode()."""
    out = tmp_path / "parity.json"
    run = subprocess.run([_tl_python(), "benchmarks/tl_parity.py", "--json", str(out),
                          *(["--processed"] if processed else [])], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.exists(), run.stderr[-3000:]
    res = json.loads(out.read_text())
    bad = [r for r in res["rows"] if not r["ok"]]
    assert not bad, "sites differing from TransformerLens:\n" + "\n".join(map(str, bad[:20]))
    assert res["logits"]["ok"], res["logits"]
    assert res["hooked"]["ok"], res["hooked"]  # a hook on hook_normalized acts as in TransformerLens
    compared = {r["site"] for r in res["rows"]}
    n_layers = 30
    wanted = {s.replace("{L}", str(L)) for s in TL_SITES for L in (range(n_layers) if "{L}" in s else [0])}
    assert wanted <= compared, f"not compared: {sorted(wanted - compared)[:10]}"
    assert len(wanted) == 603
    assert run.returncode == 0, run.stdout[-2000:]
