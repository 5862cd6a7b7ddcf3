"""Tuned-lens training throughput: fxlens' trainer vs a plain eager trainer, same run, same steps.

- fxlens: :func:`fxlens.lenses.train_lens` — one ``run_with_cache`` (residual sites only) per
  micro-batch, fused KL (logsumexp - p.z, one gradient buffer), per-layer backward.
- eager baseline: the tuned-lens 0.2 loop — HF forward with ``output_hidden_states=True``,
  ``sum(p * (log p - log_softmax(lens(h))))`` per layer through autograd, per-layer backward.

Both use the same optimiser, schedule, clipping, data order and lens class; the script checks they
reach the same lens, then reports tokens/s (median of round-robin repeats) to
``benchmarks/RESULTS_lens.md``.

    python benchmarks/lens_train.py [--steps 1] [--batch 2] [--seq-len 128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fxlens
from fxlens.lenses import TrainConfig, TunedLens, tokenize_chunks, train_lens
from fxlens.lenses.train import _optimizer, batch_indices


def eager_train(hf_model, lens: TunedLens, chunks, cfg: TrainConfig) -> float:
    """The plain trainer; returns tokens/s."""
    opt, sched = _optimizer(lens, cfg)
    params = list(lens.layer_translators.parameters())
    tokens_per_step = cfg.batch_size * chunks.seq_len
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = batch_indices(step, len(chunks), cfg.batch_size, cfg.seed)
        for mb in idx.split(cfg.micro_batch):
            ids = chunks.tokens[mb]
            with torch.no_grad():
                out = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            labels = out.logits.float().log_softmax(-1)
            for i, h in enumerate(out.hidden_states[:-1]):  # HF's last entry is already final-normed
                logp = lens(h, i).float().log_softmax(-1)
                loss = torch.sum(labels.exp() * (labels - logp), dim=-1).sum() / tokens_per_step
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
    return cfg.steps * tokens_per_step / (time.perf_counter() - t0)


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--text", default="austen:train")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_lens.md")))
    args = ap.parse_args()

    path = fxlens.offline_model_path(args.model.split(":", 1)[1]) if args.model.startswith("offline:") else args.model
    m = fxlens.from_pretrained(path)
    chunks = tokenize_chunks(m.tokenizer, args.text, args.seq_len, max_chunks=256)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, micro_batch=args.batch, warmup_steps=0,
                      progress=False)
    # Same lens from both trainers (one step each) — the comparison is of equal work.
    a = train_lens(m, chunks, cfg).lens
    b = TunedLens(m)
    eager_train(m.hf_model, b, chunks, cfg)
    diff = max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))
    print(f"max |fxlens - eager| translator difference after {cfg.steps} step(s): {diff:.2e}")

    fx, eg = [], []
    for r in range(args.repeats):  # round robin
        fx.append(train_lens(m, chunks, cfg).tokens_per_second)
        eg.append(eager_train(m.hf_model, TunedLens(m), chunks, cfg))
        print(f"repeat {r}: fxlens {fx[-1]:.2f} tok/s, eager {eg[-1]:.2f} tok/s")
    mf, me = statistics.median(fx), statistics.median(eg)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Tuned-lens training throughput",
        "",
        f"`benchmarks/lens_train.py` at {rev}: {m!r}; {cfg.steps} step(s) of {args.batch} x {args.seq_len} tokens "
        f"({args.text}), {args.repeats} round-robin repeats, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "",
        "| trainer | tokens/s (median) | runs |",
        "|---|---|---|",
        f"| fxlens `train_lens` (run_with_cache resid only, fused KL) | {mf:.2f} | {_runs(fx)} |",
        f"| eager HF `output_hidden_states` + autograd KL | {me:.2f} | {_runs(eg)} |",
        "",
        f"Speed-up {mf / me:.2f}x. Same lens from both trainers (max translator difference {diff:.1e}).",
        "Most of the time is the unembedding (d_model x 49152) run forward and backward for every layer;",
        "the model forward is a few percent of a step. The machine is shared, so absolute numbers vary.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
