"""Forward-pass overhead of fxlens vs plain HF, on SmolLM2-135M-Instruct (``make bench``).

Measures, in one process, batch 8 x 64 random tokens (fixed seed), under ``torch.no_grad``:

- HF (sdpa): ``hf_model(input_ids, attention_mask)`` as HF runs it by default (sdpa attention,
  ``use_cache`` default) and with ``use_cache=False`` (what the captured graph computes);
- fxlens no-hook forward ``m(ids)``;
- fxlens ``run_with_cache(ids)`` caching every site;
- capture: ``m.capture_seconds`` of the load, and ``fxlens.trace(hf_model, tokenizer)`` timed here.

Variants are timed round-robin (one call of each per repeat) after warm-up, so that drift in
machine load hits them alike; min and median are reported. Writes ``benchmarks/RESULTS_forward.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers

import fxlens

TARGETS = {"no-hook": 1.00, "cache-all": 1.15}
CAPTURE_TARGET_S = 5.0
# Per-head copies of the block input: [batch, pos, heads, d_model] each, the bulk of an all-sites cache.
SPLIT_INPUT = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input")
RESULTS = Path(__file__).with_name("RESULTS_forward.md")


def _git_rev() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        git = dict(cwd=root, capture_output=True, text=True)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "fxlens"], **git)
        return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    m = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))
    load_s = time.perf_counter() - t0
    hf = m.hf_model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.cfg.d_vocab, (args.batch, args.seq), generator=gen)
    mask = torch.ones_like(ids)

    n_sites = len(m.hook_names)
    n_split = sum(n.endswith(SPLIT_INPUT) for n in m.hook_names)
    with torch.no_grad():
        first_cache_s = _time(lambda: m.run_with_cache(ids))  # includes building the specialised graph
        ref = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        err = (m(ids) - ref).abs().max().item()
        _, cache = m.run_with_cache(ids)
        cache_mb = sum(t.numel() * t.element_size() for t in cache.values()) / 2**20
        del cache

    variants = {
        "HF (sdpa)": lambda: hf(input_ids=ids, attention_mask=mask),
        "HF (sdpa), use_cache=False": lambda: hf(input_ids=ids, attention_mask=mask, use_cache=False),
        "fxlens no-hook `m(ids)`": lambda: m(ids),
        f"fxlens `run_with_cache` (all {n_sites} sites)": lambda: m.run_with_cache(ids),
    }
    if n_split:
        variants[f"fxlens `run_with_cache` (all but the {n_split} split-input sites)"] = (
            lambda: m.run_with_cache(ids, names_filter=lambda n: not n.endswith(SPLIT_INPUT)))
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        for _ in range(args.repeats):
            for k, fn in variants.items():
                times[k].append(_time(fn))

    cold_s = _time(lambda: fxlens.trace(hf, m.tokenizer, graph_cache=False))
    trace_s = _time(lambda: fxlens.trace(hf, m.tokenizer))

    stats = {k: (min(v), statistics.median(v)) for k, v in times.items()}
    base = stats["HF (sdpa)"]
    base_nc = stats["HF (sdpa), use_cache=False"]
    keys = list(variants)
    ratio_rows = [
        ("no-hook / HF (sdpa)", stats[keys[2]], base, TARGETS["no-hook"]),
        ("no-hook / HF (sdpa), use_cache=False", stats[keys[2]], base_nc, TARGETS["no-hook"]),
        ("cache-all / HF (sdpa)", stats[keys[3]], base, TARGETS["cache-all"]),
        ("cache-all / HF (sdpa), use_cache=False", stats[keys[3]], base_nc, TARGETS["cache-all"]),
    ]
    if n_split:
        ratio_rows.append(("cache-all-but-split-input / HF (sdpa)", stats[keys[4]], base,
                           TARGETS["cache-all"]))

    lines = [
        "# Forward benchmark: fxlens vs HF",
        "",
        f"`make bench` (`benchmarks/forward.py`), {datetime.date.today().isoformat()}. "
        f"SmolLM2-135M-Instruct (fp32, CPU), batch {args.batch} x {args.seq} random tokens (seed 0), "
        f"`torch.no_grad`, {args.warmup} warm-up rounds, {args.repeats} repeats timed round-robin. "
        f"fxlens at {_git_rev()}.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}, {platform.processor() or 'cpu'}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; 1-min load average at start {load_avg:.2f}.",
        "",
        "| run | min (ms) | median (ms) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {lo * 1e3:.1f} | {med * 1e3:.1f} |" for k, (lo, med) in stats.items()]
    lines += ["", "| ratio | min | median | target | met (min / median) |", "|---|---:|---:|---:|---|"]
    for name, (a_lo, a_med), (b_lo, b_med), target in ratio_rows:
        r_lo, r_med = a_lo / b_lo, a_med / b_med
        met = " / ".join("yes" if r <= target else "no" for r in (r_lo, r_med))
        lines.append(f"| {name} | {r_lo:.3f} | {r_med:.3f} | ≤ {target:.2f} | {met} |")
    lines += [
        "",
        "| capture | seconds | target | met |",
        "|---|---:|---:|---|",
        f"| cold: `fxlens.trace(hf_model, tokenizer, graph_cache=False)` (torch.export + site placement) "
        f"| {cold_s:.2f} | ≤ {CAPTURE_TARGET_S:.0f} | {'yes' if cold_s <= CAPTURE_TARGET_S else 'no'} |",
        f"| warm: `fxlens.trace(hf_model, tokenizer)` (graph + sites from the on-disk graph cache) "
        f"| {trace_s:.2f} | ≤ {CAPTURE_TARGET_S:.0f} | {'yes' if trace_s <= CAPTURE_TARGET_S else 'no'} |",
        "",
        f"Also: `from_pretrained` total {load_s:.1f} s (GGUF cache warm); first `run_with_cache` over "
        f"all sites (builds the specialised graph) {first_cache_s:.2f} s; the all-sites cache holds "
        f"{cache_mb:.0f} MiB; "
        f"max |logits(fxlens) − logits(HF)| = {err:.2e}.",
        "",
        "Timings on a shared 2-core machine are noisy (medians move by 5–15 % between runs when another "
        "process is busy); min is the least disturbed figure.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
