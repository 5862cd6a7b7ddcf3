"""Fresh-subprocess probes: setup and first-call latency, and peak memory, of one tool on one workload.

``python -m peers.probe --tool fxlens --work forward --path DIR`` imports the tool, loads the HF
checkpoint, builds the tool over it, runs the workload twice and prints one JSON line:

- ``import_s``: importing torch, transformers and the tool's package;
- ``load_s``: ``from_pretrained`` of the HF model (the same for every tool);
- ``setup_s``: building the tool over it (fxlens: capture or graph-cache load; bridge: ``boot_transformers``;
  nnsight: wrapping; HF: nothing);
- ``first_s`` / ``second_s``: the workload's first call (fxlens: builds and, compiled, compiles the graph)
  and a second one;
- ``rss_loaded_mb``: resident memory after imports and the HF load (every weight read once, since
  safetensors are memory-mapped); ``peak_rss_mb``: the process' peak resident set (``VmHWM`` in
  ``/proc/self/status``), both from the kernel's accounting of this process. Not ``getrusage``'s
  ``ru_maxrss``: Linux carries it over from the parent across fork + exec, so every probe would report
  the benchmark driver's own peak.

Loops patch ``--cells`` cells only (memory per cell does not grow with their number).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BATCH, CLEAN, CORRUPTED, SEQ, error_text

WORK_ATTN = {"forward": "sdpa", "cache": "eager", "patching": "sdpa"}
TOOL_PKG = {"hf": None, "fxlens": "fxlens", "bridge": "transformer_lens.model_bridge", "nnsight": "nnsight"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process' resident-set high-water mark (``VmHWM``, per address space, so reset by exec)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024


def probe(tool: str, work: str, path: str, threads: int, compile: bool, cells: int, batched: bool) -> dict:
    """Run one probe in this process (meant to be a fresh one) and return its measurements."""
    t0 = time.perf_counter()
    import importlib

    import torch
    import transformers

    torch.set_num_threads(threads)
    if TOOL_PKG[tool]:
        importlib.import_module(TOOL_PKG[tool])
    from . import tools as T

    out: dict = {"import_s": time.perf_counter() - t0}
    tok = transformers.AutoTokenizer.from_pretrained(path)
    t0 = time.perf_counter()
    # The bridge forces eager attention on whatever it is given; the fxlens graph expands attention itself.
    hf_model = T.load_hf(path, "sdpa" if tool in ("fxlens", "bridge") else WORK_ATTN[work])
    out["load_s"] = time.perf_counter() - t0
    with torch.no_grad():  # safetensors are memory-mapped: fault every weight in, so RSS counts them from here
        for p in hf_model.parameters():
            p.sum()
    out["rss_loaded_mb"] = _rss_mb()
    t0 = time.perf_counter()
    kw = {"compile": compile} if tool == "fxlens" else {}
    adapter = T.TOOLS[tool](path, tok, hf_model=hf_model, **kw)
    out["setup_s"] = time.perf_counter() - t0
    if tool == "fxlens":
        out["graph_from_cache"] = adapter.model.graph_from_cache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_model.config.vocab_size, (BATCH, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    if work == "patching":
        clean, corrupted = (tok(s, return_tensors="pt").input_ids for s in (CLEAN, CORRUPTED))
        mary, john = tok.encode(" Mary")[0], tok.encode(" John")[0]

        def metric(logits):
            return logits[0, -1, mary] - logits[0, -1, john]

        grid = [(layer, p) for layer in range(hf_model.config.num_hidden_layers) for p in range(clean.shape[1])]
        sub = None if tool == "fxlens" or batched else grid[:cells]
        pkw = {"batched": True} if batched else {}
        out["cells"] = len(grid) if sub is None else len(sub)
        with torch.no_grad():
            call = adapter.patcher(clean, corrupted, metric, cells=sub, **pkw)
    else:
        fn = adapter.forward if work == "forward" else adapter.cache

        def call():
            return fn(ids, mask)

    with torch.no_grad():
        for key in ("first_s", "second_s") if work != "patching" else ("first_s",):
            t0 = time.perf_counter()
            call()
            out[key] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


#: (label, tool, work, flags, cache mode): the probes ``make bench`` runs, in this order.
PROBES: list[tuple[str, str, str, tuple[str, ...], str]] = [
    ("HF (sdpa)", "hf", "forward", (), ""),
    ("fxlens, graph cache cold (torch.export)", "fxlens", "forward", (), "nograph"),
    ("fxlens, graph cache warm", "fxlens", "forward", (), ""),
    ("fxlens compiled, inductor cache cold", "fxlens", "forward", ("--compile",), "inductor-cold"),
    ("fxlens compiled, inductor cache warm", "fxlens", "forward", ("--compile",), "inductor-warm"),
    ("TransformerBridge", "bridge", "forward", (), ""),
    ("nnsight", "nnsight", "forward", (), ""),
    ("HF forward hooks (eager)", "hf", "cache", (), ""),
    ("fxlens", "fxlens", "cache", (), ""),
    ("TransformerBridge", "bridge", "cache", (), ""),
    ("nnsight (eager)", "nnsight", "cache", (), ""),
    ("HF pre-hook loop", "hf", "patching", (), ""),
    ("fxlens sweep", "fxlens", "patching", (), ""),
    ("TransformerLens patching on the bridge", "bridge", "patching", (), ""),
    ("nnsight loop", "nnsight", "patching", (), ""),
    ("nnsight batched invokes", "nnsight", "patching", ("--batched",), ""),
]


def run_all(path: str, threads: int, cells: int, only: set[str] | None = None) -> list[dict]:
    """Run :data:`PROBES` (works in ``only``, default all), each in a fresh subprocess of this interpreter."""
    results = []
    inductor_dir = tempfile.mkdtemp(prefix="fxlens-bench-inductor-")  # fresh: the first compile is cold
    env0 = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TQDM_DISABLE="1")
    for label, tool, work, flags, mode in PROBES:
        if only and work not in only:
            continue
        env = dict(env0)
        if mode == "nograph":
            env["FXLENS_GRAPH_CACHE"] = "0"
        if mode.startswith("inductor"):
            env["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir
        cmd = [sys.executable, "-m", "peers.probe", "--tool", tool, "--work", work, "--path", path,
               "--threads", str(threads), "--cells", str(cells), *flags]
        print(f"probe: {label} / {work}", flush=True)
        row = {"label": label, "tool": tool, "work": work, "mode": mode}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
        else:
            tail = " ".join(proc.stderr.strip().splitlines()[-3:])
            row["error"] = f"probe exited {proc.returncode}: {tail[-400:]}"
        results.append(row)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tool", choices=sorted(TOOL_PKG), required=True)
    ap.add_argument("--work", choices=sorted(WORK_ATTN), required=True)
    ap.add_argument("--path", required=True, help="HF checkpoint folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", type=int, default=28, help="cells a patching loop runs")
    ap.add_argument("--compile", action="store_true", help="fxlens: compile=True")
    ap.add_argument("--batched", action="store_true", help="nnsight patching: all cells as invokes of one trace")
    a = ap.parse_args()
    try:
        res = probe(a.tool, a.work, a.path, a.threads, a.compile, a.cells, a.batched)
    except Exception as exc:
        res = {"error": error_text(exc)}
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
