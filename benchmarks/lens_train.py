"""Tuned-lens training throughput against the matmul roofline and a plain eager trainer, same run.

- fxlens: :func:`fxlens.lenses.train_lens` — one ``run_with_cache`` (residual sites only) per
  micro-batch, all layers translated in one batched graph, the unembedding + KL gradient computed
  block by block outside autograd (:mod:`fxlens.lenses.fused`), one backward; float32, and with
  ``bf16_unembed`` (bfloat16 matmuls, float32 softmax).
- eager baseline: the tuned-lens 0.2 loop — HF forward with ``output_hidden_states=True``,
  ``sum(p * (log p - log_softmax(lens(h))))`` per layer through autograd, per-layer backward.
- roofline: a plain ``[tokens, d_model] @ [d_model, d_vocab]`` matmul with the model's unembedding
  and its input-gradient matmul ``[tokens, d_vocab] @ [d_vocab, d_model]``, once per layer: the
  unembedding work a step cannot avoid (the model forward and translators are extra).

Each round runs every contender once (round robin); the report gives per-contender medians and the
median of the per-round ratios (the machine may be shared: ratios within a round are like for like).
The script checks the fxlens and eager trainers reach the same lens, and trains a float32 and a bf16
lens on the same data to compare their per-layer bits/byte on held-out text.

    python benchmarks/lens_train.py [--steps 1] [--batch 2] [--seq-len 128] [--rounds 5] [--quality-steps 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fxlens
from fxlens.lenses import TrainConfig, TunedLens, evaluate, tokenize_chunks, train_lens
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


def matmul_roofline(weight: torch.Tensor, tokens: int, n_layers: int, dtype: torch.dtype) -> float:
    """Tokens/s of the bare unembedding matmuls (forward and input gradient) of ``n_layers`` layers."""
    w = weight.detach().to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, w.shape[1], generator=g).to(dtype)
    dz = torch.randn(tokens, w.shape[0], generator=g).to(dtype)
    torch.mm(x, w.t()), torch.mm(dz, w)  # warm
    t0 = time.perf_counter()
    for _ in range(n_layers):
        torch.mm(x, w.t())
        torch.mm(dz, w)
    return tokens / (time.perf_counter() - t0)


def _runs(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="offline:smollm2")
    ap.add_argument("--text", default="austen:train")
    ap.add_argument("--eval-text", default="austen:eval")
    ap.add_argument("--steps", type=int, default=1, help="optimiser steps per timed run")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quality-steps", type=int, default=6, help="steps of the fp32-vs-bf16 lens comparison")
    ap.add_argument("--eval-chunks", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_lens.md")))
    args = ap.parse_args()

    path = fxlens.offline_model_path(args.model.split(":", 1)[1]) if args.model.startswith("offline:") else args.model
    m = fxlens.from_pretrained(path)
    chunks = tokenize_chunks(m.tokenizer, args.text, args.seq_len, max_chunks=256)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, micro_batch=args.batch, warmup_steps=0,
                      progress=False)
    cfg16 = TrainConfig(**{**cfg.__dict__, "bf16_unembed": True})
    n, tokens = m.cfg.n_layers, args.batch * args.seq_len
    weight = TunedLens(m).unembed.weight
    runs: dict[str, list[float]] = {k: [] for k in ("fx", "fx16", "eager", "mm", "mm16")}
    diff = float("nan")
    for r in range(args.rounds):  # round robin
        res = train_lens(m, chunks, cfg)
        runs["fx"].append(res.tokens_per_second)
        runs["mm"].append(matmul_roofline(weight, tokens, n, weight.dtype))
        runs["fx16"].append(train_lens(m, chunks, cfg16).tokens_per_second)
        runs["mm16"].append(matmul_roofline(weight, tokens, n, torch.bfloat16))
        eager = TunedLens(m)
        runs["eager"].append(eager_train(m.hf_model, eager, chunks, cfg))
        if r == 0:  # same lens from both trainers: the comparison is of equal work
            diff = max(float((x - y).detach().abs().max()) for x, y in zip(res.lens.layer_translators.parameters(),
                                                                             eager.layer_translators.parameters()))
            print(f"max |fxlens - eager| translator difference after {cfg.steps} step(s): {diff:.2e}", flush=True)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + " tok/s", flush=True)
    ratio = {
        "fx/mm": [f / x for f, x in zip(runs["fx"], runs["mm"])],
        "fx/eager": [f / x for f, x in zip(runs["fx"], runs["eager"])],
        "fx16/mm": [f / x for f, x in zip(runs["fx16"], runs["mm"])],
        "fx16/mm16": [f / x for f, x in zip(runs["fx16"], runs["mm16"])],
        "fx16/fx": [f / x for f, x in zip(runs["fx16"], runs["fx"])],
        "fx16/eager": [f / x for f, x in zip(runs["fx16"], runs["eager"])],
    }

    # fp32 vs bf16 lens quality: same data, same steps; both evaluated in float32 (and timed).
    qcfg = dict(steps=args.quality_steps, batch_size=args.batch, micro_batch=args.batch, progress=False)
    lens32 = train_lens(m, chunks, TrainConfig(**qcfg)).lens
    lens16 = train_lens(m, chunks, TrainConfig(**qcfg, bf16_unembed=True)).lens
    held = tokenize_chunks(m.tokenizer, args.eval_text, args.seq_len, max_chunks=args.eval_chunks)
    lenses = {"fp32-trained": lens32, "bf16-trained": lens16}
    t0 = time.perf_counter()
    ev = evaluate(m, held, lenses, micro_batch=args.batch, progress=False)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev16 = evaluate(m, held, lenses, micro_batch=args.batch, progress=False, bf16_unembed=True)
    t_eval16 = time.perf_counter() - t0
    bpb32, bpb16 = (ev.metrics[k]["bits_per_byte"] for k in lenses)
    d_train = max(abs(x - y) for x, y in zip(bpb32, bpb16))
    d_eval = max(abs(x - y) for k in lenses for x, y in zip(ev.metrics[k]["bits_per_byte"],
                                                            ev16.metrics[k]["bits_per_byte"]))

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    flop = 4 * tokens * weight.shape[0] * weight.shape[1] * n
    mm_gf = _med(runs["mm"]) * flop / tokens / 1e9
    mm16_gf = _med(runs["mm16"]) * flop / tokens / 1e9
    fx, fx16, eg = _med(runs["fx"]), _med(runs["fx16"]), _med(runs["eager"])
    lines = [
        "# Tuned-lens training throughput",
        "",
        f"`benchmarks/lens_train.py` at {rev}: {m!r}; {cfg.steps} step(s) of {args.batch} x {args.seq_len} "
        f"tokens ({args.text}) per timed run, {args.rounds} round-robin rounds, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; load average {load:.1f} at the "
        "end (the machine is shared with other jobs: absolute numbers vary, the ratios are within one round).",
        "",
        f"The unembedding costs {flop / tokens / 1e9:.2f} GFLOP per token ({n} layers x {weight.shape[1]} x "
        f"{weight.shape[0]}, forward and input gradient). Roofline = the bare matmuls of those shapes "
        f"([{tokens}, {weight.shape[1]}] @ [{weight.shape[1]}, {weight.shape[0]}] and back, once per layer) in the "
        f"same rounds: median {mm_gf:.0f} GFLOP/s float32, {mm16_gf:.0f} GFLOP/s bfloat16.",
        "",
        "| contender | tokens/s (median) | runs |",
        "|---|---|---|",
        f"| fxlens `train_lens`, float32 | {fx:.2f} | {_runs(runs['fx'])} |",
        f"| fxlens `train_lens`, `bf16_unembed=True` | {fx16:.2f} | {_runs(runs['fx16'])} |",
        f"| eager HF `output_hidden_states` + autograd KL (float32) | {eg:.2f} | {_runs(runs['eager'])} |",
        f"| roofline: bare unembedding matmuls, float32 | {_med(runs['mm']):.2f} | {_runs(runs['mm'])} |",
        f"| roofline: bare unembedding matmuls, bfloat16 | {_med(runs['mm16']):.2f} | {_runs(runs['mm16'])} |",
        "",
        "| ratio (median of per-round ratios) | value | per round | target |",
        "|---|---|---|---|",
        f"| fxlens fp32 / fp32 roofline | {_med(ratio['fx/mm']):.0%} | {_runs(ratio['fx/mm'])} | >= 60% |",
        f"| fxlens fp32 / eager | {_med(ratio['fx/eager']):.2f}x | {_runs(ratio['fx/eager'])} | >= 3x |",
        f"| fxlens bf16 / fp32 roofline | {_med(ratio['fx16/mm']):.0%} | {_runs(ratio['fx16/mm'])} | |",
        f"| fxlens bf16 / bf16 roofline | {_med(ratio['fx16/mm16']):.0%} | {_runs(ratio['fx16/mm16'])} | |",
        f"| fxlens bf16 / fxlens fp32 | {_med(ratio['fx16/fx']):.2f}x | {_runs(ratio['fx16/fx'])} | |",
        f"| fxlens bf16 / eager | {_med(ratio['fx16/eager']):.2f}x | {_runs(ratio['fx16/eager'])} | |",
        "",
        f"Same lens from the fxlens and eager trainers (max translator difference {diff:.1e} after "
        f"{cfg.steps} step(s)).",
        "",
        f"## bf16 unembedding: lens quality ({args.quality_steps} steps x {args.batch * args.seq_len} tokens, "
        f"same data; evaluated on {ev.n_tokens} tokens of {args.eval_text})",
        "",
        f"Max per-layer |bits/byte(fp32-trained) - bits/byte(bf16-trained)| = {d_train:.4f} (target < 0.02); "
        f"bf16 evaluation vs float32 evaluation of the same lenses: max {d_eval:.4f} bits/byte. "
        f"Evaluation time (both lenses): float32 {t_eval:.1f} s, bf16 {t_eval16:.1f} s "
        f"({2 * ev.n_tokens / t_eval:.1f} vs {2 * ev.n_tokens / t_eval16:.1f} lens-tokens/s). "
        "These lenses are short runs for the comparison, not the trained lens of docs/lenses.md.",
        "",
        ev.markdown().replace("fp32-trained − ", "").replace(" | bf16-trained |", " | bf16-trained |"),
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
