"""A patching sweep on 1 process vs 2 torchrun ranks: SmolLM2-135M, IOI pair, resid_pre x position.

    PYTHONPATH=. .venv/bin/python benchmarks/sweep_ranks.py [--batch-size 16] [--repeats 3] [--ranks 2]

Times the sweep (model loaded, segments built and warmed up first) in this process with 1 and with
``--ranks`` torch threads, then under ``torchrun --standalone --nproc_per_node=RANKS`` with 1 thread
per rank and the same ``batch_size`` (so the ranks run the very chunks one process runs), and
checks the results are equal. Run under torchrun itself, the script is one rank of that run.
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

import torch

import fxlens
from fxlens.interventions import patching as P

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def setup():
    m = fxlens.from_pretrained(fxlens.offline_model_path("smollm2"))
    clean, corrupted = m.to_tokens(CLEAN), m.to_tokens(CORRUPTED)
    mary, john = m.to_single_token(" Mary"), m.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    _, cache = m.run_with_cache(clean, names_filter=[f"blocks.{L}.hook_resid_pre" for L in range(m.cfg.n_layers)])
    return m, corrupted, cache, metric


def timed(m, corrupted, cache, metric, repeats: int, **kw) -> tuple[list[float], torch.Tensor]:
    """Seconds of each sweep after a warm-up sweep, and its result."""
    import torch.distributed as dist

    out = P.get_act_patch_resid_pre(m, corrupted, cache, metric, logits_at=-1, progress=False, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        out = P.get_act_patch_resid_pre(m, corrupted, cache, metric, logits_at=-1, progress=False, **kw)
        times.append(time.perf_counter() - t)
    return times, out


def rank_main(args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    m, corrupted, cache, metric = setup()
    times, out = timed(m, corrupted, cache, metric, args.repeats, batch_size=args.batch_size)  # ranks="auto"
    if dist.get_rank() == 0:
        torch.save({"times": times, "out": out}, args.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16, help="rows per forward (10 chunks of the 146 computed cells)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", default=None, help="(ranks) where rank 0 saves its times and result")
    args = ap.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return rank_main(args)
    m, corrupted, cache, metric = setup()
    rows = {}
    for threads in (1, args.ranks):
        torch.set_num_threads(threads)
        for bs in (args.batch_size, 512):
            rows[f"1 process, {threads} thread(s), batch_size={bs}"] = timed(m, corrupted, cache, metric,
                                                                             args.repeats, batch_size=bs, ranks=None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.pt"
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={args.ranks}", __file__,
                        f"--batch-size={args.batch_size}", f"--repeats={args.repeats}", f"--out={out}"],
                       env=env, check=True)
        got = torch.load(out)
    label = f"{args.ranks} ranks (torchrun, gloo), 1 thread each, batch_size={args.batch_size}"
    rows[label] = (got["times"], got["out"])
    ref = rows[f"1 process, 1 thread(s), batch_size={args.batch_size}"][1]
    print(f"SmolLM2-135M, IOI resid_pre x position ({ref.numel()} cells), median of {args.repeats}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for label, (times, res) in rows.items():
        diff = (res - ref).abs().max().item()
        print(f"  {label:60s} {sorted(times)[len(times) // 2]:6.2f} s   "
              f"{'equal' if torch.equal(res, ref) else f'max |diff| {diff:.1e}'} to 1 process, 1 thread")
    print(json.dumps({k: sorted(v[0])[len(v[0]) // 2] for k, v in rows.items()}))


if __name__ == "__main__":
    main()
