"""Pure logic of the peer benchmarks (benchmarks/peers): equality checks, timing stats, report tables.

No peer tool is imported: these run in the main .venv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers import common, report  # noqa: E402


def test_cache_names_order_and_count():
    names = common.cache_names(30)
    assert len(names) == 300
    assert names[0] == "blocks.0.hook_resid_pre"
    assert names[9] == "blocks.0.attn.hook_pattern"
    assert names[-1] == "blocks.29.attn.hook_pattern"


def test_max_abs_reshapes_flattened_peer_tensors():
    ref = torch.arange(24.0).reshape(2, 3, 2, 2)  # [B, S, H, D] as TL names it
    flat = ref.reshape(2, 3, 4).clone()  # q_proj output [B, S, H*D]
    assert common.max_abs(flat, ref) == 0.0
    flat[1, 2, 3] += 0.25
    assert common.max_abs(flat, ref) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="cannot compare"):
        common.max_abs(torch.zeros(5), ref)


def test_max_abs_dict_worst_site_and_missing():
    ref = {"a": torch.zeros(3), "b": torch.ones(3), "c": torch.zeros(2)}
    got = {"a": torch.tensor([0.0, 0.1, 0.0]), "b": torch.tensor([1.0, 1.0, 1.5]), "c": torch.zeros(2),
           "extra": torch.zeros(1)}
    worst, where = common.max_abs_dict(got, ref)
    assert (worst, where) == (pytest.approx(0.5), "b")
    assert common.max_abs_dict({k: v.clone() for k, v in ref.items()}, ref) == (0.0, "a")
    with pytest.raises(KeyError, match="1 sites missing"):
        common.max_abs_dict({"a": ref["a"], "b": ref["b"]}, ref)


def test_round_robin_interleaves_and_counts():
    calls: list[str] = []
    stats = common.round_robin({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}, repeats=3, warmup=2)
    assert calls == ["x", "y"] * 5
    assert [len(s.samples) for s in stats.values()] == [3, 3]
    s = common.Stats([3.0, 1.0, 2.0, 10.0])
    assert (s.min, s.median) == (1.0, 2.5)


def test_error_text_is_one_line_with_location():
    try:
        raise RuntimeError("boom\n  second line")
    except RuntimeError as exc:
        text = common.error_text(exc)
    assert text.startswith("RuntimeError: boom second line (at test_bench_peers.py:")
    assert "\n" not in text


def test_stat_extrapolates_subset_rows_and_skips_failures():
    row = {"label": "loop", "samples": [2.0, 4.0, 3.0], "cells": 420, "timed_cells": 42}
    assert report.stat(row, "min") == pytest.approx(20.0)
    assert report.stat(row, "median") == pytest.approx(30.0)
    assert report.stat({"label": "x", "samples": [1.0], "error": "E"}, "min") is None
    assert report.ratio(3.0, 2.0) == 1.5 and report.ratio(None, 2.0) is None and report.ratio(1.0, 0) is None


def _res(fx_fwd: float, fx_cache: float, loop_s: float) -> dict:
    fwd = [{"label": report.HF_FORWARD, "samples": [1.0, 1.0]},
           {"label": report.HF_USE_CACHE_FALSE, "samples": [0.9, 0.9]},
           {"label": report.FX_FORWARD, "samples": [fx_fwd, fx_fwd]},
           {"label": report.FX_FORWARD_COMPILED, "error": "RuntimeError: no compiler"}]
    cache = [{"label": report.HF_CACHE_BASE, "samples": [2.0]}, {"label": report.FX_CACHE, "samples": [fx_cache]}]
    patch = [{"label": "fxlens sweep", "samples": [2.0, 3.0, 4.0], "cells": 420, "timed_cells": 420},
             {"label": "TransformerLens patching", "samples": [loop_s], "cells": 420, "timed_cells": 420},
             {"label": "nnsight loop (one trace per cell)", "samples": [loop_s / 10], "cells": 420,
              "timed_cells": 42},
             {"label": "HF forward pre-hook loop", "samples": [60.0], "cells": 420, "timed_cells": 420}]
    meta = {"cpu": "Test CPU", "cores": 2, "threads": 1, "load_start": 2.0, "load_end": 0.5, "versions": {}}
    return {"meta": meta, "forward": fwd, "cache": cache, "patching": patch, "probes": []}


def test_targets_values_and_verdicts():
    got = {t[0]: t[1:] for t in report.targets(_res(fx_fwd=0.95, fx_cache=2.4, loop_s=33.0))}
    assert got["no-hook forward / HF (sdpa)"] == (pytest.approx(0.95), pytest.approx(0.95), "≤ 1.00", True, None)
    assert got["no-hook forward / HF (sdpa), use_cache=False"][1:4] == (pytest.approx(0.95 / 0.9), "≤ 1.00", False)
    assert got["no-hook forward, compiled / HF (sdpa)"] == (None, None, "≤ 1.00", None, None)
    assert got["cache-all / HF (sdpa) plain forward"][1:4] == (pytest.approx(1.2), "≤ 1.15", False)
    tl = got["fxlens sweep speed-up over the TransformerBridge (TL patching)"]
    assert tl == (pytest.approx(16.5), pytest.approx(11.0), "≥ 10", True, None)
    nn = got["fxlens sweep speed-up over the nnsight loop"]  # 3.3 s on 42 of 420 cells -> 33 s
    assert nn[1] == pytest.approx(11.0) and nn[3] is True
    lines, missed = report.targets_table(_res(fx_fwd=0.95, fx_cache=2.4, loop_s=25.0))
    assert [x.split(" (")[0] for x in missed] == [
        "no-hook forward / HF", "cache-all / HF", "fxlens sweep speed-up over the TransformerBridge",
        "fxlens sweep speed-up over the nnsight loop"]
    assert missed[0] == "no-hook forward / HF (sdpa), use_cache=False (1.056 vs ≤ 1.00)"
    assert missed[1] == "cache-all / HF (sdpa) plain forward (1.200 vs ≤ 1.15)"
    assert "| n/a (no result) |" in lines[4]


def test_tables_format_ratios_failures_and_extrapolation():
    res = _res(fx_fwd=0.95, fx_cache=2.4, loop_s=33.0)
    fwd = report.timed_table(res["forward"], report.HF_FORWARD, report.FX_FORWARD)
    assert fwd[2] == "| HF (sdpa) | 1000.0 | 1000.0 | 1.00× | 1.05× | – |  |"
    assert fwd[4].startswith("| fxlens `m(ids)` | 950.0 | 950.0 | 0.95× | 1.00× |")
    assert "**failed**: `RuntimeError: no compiler`" in fwd[5]
    patch = report.patching_table(res["patching"])
    assert patch[2].startswith("| fxlens sweep | 420 of 420 | 3 | 2.00 / 3.00 | 140.0 | 1.0× | 0.05× |")
    assert "| nnsight loop (one trace per cell) | 42 of 420 | 1 | 33.00 / 33.00 | 12.7 | 11.0× |" in patch[4]
    assert "**extrapolated** from 42 of 420 cells" in patch[4]


def test_probe_tables_and_render():
    probes = [{"label": "fxlens", "tool": "fxlens", "work": "forward", "mode": "", "import_s": 1.0, "load_s": 0.5,
               "setup_s": 0.25, "first_s": 2.0, "second_s": 1.5, "rss_loaded_mb": 1000.0, "peak_rss_mb": 1600.0,
               "graph_from_cache": True},
              {"label": "nnsight", "tool": "nnsight", "work": "cache", "mode": "", "error": "probe exited 1: X"}]
    lines = report.probes_tables(probes)
    assert lines[2] == "| fxlens | 1.00 | 0.50 | 0.25 | 2.00 | 1.50 | graph loaded from the disk cache |"
    assert "| forward | fxlens | 1000 | 1600 | 600 |  |" in lines
    assert any(x.startswith("| cache | nnsight | – | – | – | **failed**") for x in lines)
    res = _res(fx_fwd=0.95, fx_cache=2.4, loop_s=33.0)
    res["probes"] = probes
    text = report.render(res, ["install notes here"])
    assert "**Missed targets:** no-hook forward / HF (sdpa), use_cache=False (1.056 vs ≤ 1.00); cache-all" in text
    assert "The machine was busy (load > 1.5)" in text
    assert text.rstrip().endswith("install notes here")


def test_round_spread_says_when_a_miss_is_noise():
    hf = {"label": report.HF_FORWARD, "samples": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
    fx = {"label": report.FX_FORWARD, "samples": [0.96, 1.05, 0.98, 1.04, 1.06, 0.97]}
    lo, hi = report.round_spread(fx, hf)
    assert lo < 1.0 < hi
    assert report.round_spread(fx, {"label": "x", "samples": [1.0]}) is None
    res = {"forward": [hf, fx, {**hf, "label": report.HF_USE_CACHE_FALSE}], "cache": [], "patching": []}
    _, missed = report.targets_table(res)
    assert missed[0].startswith("no-hook forward / HF (sdpa) (1.010 vs ≤ 1.00): within this run's round-to-round")
    fx["samples"] = [1.2] * 6
    _, missed = report.targets_table(res)
    assert missed[0] == "no-hook forward / HF (sdpa) (1.200 vs ≤ 1.00)"


def test_probe_peak_memory_is_the_child_process_own():
    """A probe's peak RSS must not inherit the driver's (``ru_maxrss`` does, across fork + exec)."""
    import subprocess

    from peers import probe

    big = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
    parent_peak = probe._peak_rss_mb()
    assert parent_peak >= probe._rss_mb() >= big.numel() * 4 / 2**20
    code = "from peers.probe import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "benchmarks")})
    assert float(out.stdout) < parent_peak - 300
