"""``fxlens lens train | eval | plot``: the lens subcommands (wired into :mod:`fxlens.cli`).

    fxlens lens train --model offline:smollm2 --text austen:train --out lens/ [--steps 250 ...]
    torchrun --nproc_per_node=2 -m fxlens.cli lens train ...          (data parallel)
    fxlens lens eval  --model offline:smollm2 --text austen:eval --lens lens/ --out eval/
    fxlens lens plot  --eval eval/eval.json --out plots/ [--model M --lens lens/ --prompt TEXT]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

from ..cli_args import load_model, positive_int
from .train import TrainConfig


def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def _add_config_args(p: argparse.ArgumentParser, cls) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        if f.type in ("bool", bool):
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=help_)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        p.add_argument(flag, type=kind, default=f.default, help=help_)


def _common(p: argparse.ArgumentParser, text_help: str) -> None:
    p.add_argument("--model", required=True,
                   help="hub name, local folder, .gguf file, or offline:smollm2 (the shipped SmolLM2-135M)")
    p.add_argument("--text", nargs="+", required=True,
                   help=text_help + " .txt files, folders of them, or austen:train / austen:eval")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per chunk (default: 128)")
    p.add_argument("--max-chunks", type=positive_int, default=None,
                   help="use only N chunks, evenly spaced over the text")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: each rank's own GPU)")
    p.add_argument("--device-map", default=None, help="HF device_map (e.g. auto: layers spread over the GPUs)")


def add_lens(sub) -> None:
    """Register ``fxlens lens {train,eval,plot}``."""
    lens = sub.add_parser("lens", help="logit lens / tuned lens: train, evaluate, plot",
                          description="Train tuned lenses, evaluate them against the logit lens, plot them.")
    cmds = lens.add_subparsers(dest="lens_command", metavar="ACTION", required=True)

    t = cmds.add_parser("train", help="train a tuned lens (torchrun for data parallel)",
                        description="Train a tuned lens: KL(final || lens) over all layers, SGD Nesterov.")
    _common(t, "training text:")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    _add_config_args(t, TrainConfig)
    t.set_defaults(func=cmd_train)

    e = cmds.add_parser("eval", help="per-layer cross-entropy, KL and bits/byte of the logit and tuned lens",
                        description="Evaluate the logit lens (and a tuned lens with --lens) on held-out text; "
                                    "writes OUT/eval.json and prints a per-layer table.")
    _common(e, "held-out text:")
    e.add_argument("--lens", default=None, help="tuned lens folder (fxlens or tuned-lens format)")
    e.add_argument("--micro-batch", type=positive_int, default=4, help="sequences per forward (default: 4)")
    e.add_argument("--bf16-unembed", action="store_true",
                   help="run the lens unembedding matmuls in bfloat16 (float32 softmax and sums)")
    e.set_defaults(func=cmd_eval)

    p = cmds.add_parser("plot", help="bits/byte curve from eval.json; trajectory heatmap for a prompt",
                        description="Plot OUT/bits_per_byte.png (and kl.png) from an eval.json, and with "
                                    "--model/--prompt the trajectory heatmap of each lens.")
    p.add_argument("--eval", default=None, help="eval.json written by `fxlens lens eval`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model (for --prompt)")
    p.add_argument("--lens", default=None, help="tuned lens folder (for --prompt)")
    p.add_argument("--prompt", default=None, help="text whose prediction trajectory to plot")
    p.add_argument("--layer-stride", type=positive_int, default=1, help="show every k-th layer in the heatmap")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-map", default=None, help="HF device_map (e.g. auto: layers spread over the GPUs)")
    p.set_defaults(func=cmd_plot)


def _load_model(args):
    import os

    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return load_model(args.model, args.dtype, device, args.device_map)


def cmd_train(args) -> int:
    from .data import tokenize_chunks
    from .train import init_distributed, train_lens

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})  # check first
    rank, world = init_distributed()
    model = _load_model(args)
    chunks = tokenize_chunks(model.tokenizer, args.text, args.seq_len, args.max_chunks)
    if rank == 0:
        print(f"{model!r}\ntraining on {len(chunks)} chunks x {chunks.seq_len} tokens from {len(chunks.sources)} "
              f"files; {cfg.steps} steps x {cfg.batch_size * chunks.seq_len} tokens; {world} process(es)")
    res = train_lens(model, chunks, cfg, out=args.out, resume=args.resume)
    if rank == 0:
        last = res.losses[-1] if res.losses else []
        print(f"done: {res.steps_run} steps run, {res.tokens_per_second:.1f} tokens/s; "
              f"final mean KL {sum(last) / max(1, len(last)):.4f} nats/token; lens saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .data import tokenize_chunks
    from .eval import evaluate
    from .logit_lens import LogitLens
    from .tuned_lens import load_lens

    model = _load_model(args)
    chunks = tokenize_chunks(model.tokenizer, args.text, args.seq_len, args.max_chunks)
    lenses = {"logit lens": LogitLens(model)}
    if args.lens:
        lenses["tuned lens"] = load_lens(model, args.lens)
    ev = evaluate(model, chunks, lenses, micro_batch=args.micro_batch, bf16_unembed=args.bf16_unembed)
    path = ev.save(Path(args.out) / "eval.json")
    print(f"{ev.n_tokens} tokens, {ev.n_bytes} bytes; bits per byte:\n{ev.markdown()}\nwritten: {path}")
    return 0


def cmd_plot(args) -> int:
    from . import plots

    out = Path(args.out)
    written = []
    if args.eval:
        from .eval import LensEval

        ev = LensEval.load(args.eval)
        written += [plots.plot_metric(ev, out / "bits_per_byte.png"), plots.plot_metric(ev, out / "kl.png", "kl")]
        if plots.plotly_available():
            written.append(plots.metric_html(ev, out / "bits_per_byte.html"))
    if args.prompt:
        if not args.model:
            raise ValueError("--prompt needs --model (and optionally --lens)")
        from .eval import PredictionTrajectory
        from .logit_lens import LogitLens
        from .tuned_lens import load_lens

        model = _load_model(args)
        lenses = {"logit_lens": LogitLens(model)}
        if args.lens:
            lenses["tuned_lens"] = load_lens(model, args.lens)
        for name, lens in lenses.items():
            traj = PredictionTrajectory.from_lens(model, lens, args.prompt, lens_name=name.replace("_", " "))
            written.append(plots.plot_trajectory(traj, out / f"trajectory_{name}.png", layer_stride=args.layer_stride))
            if plots.plotly_available():
                written.append(plots.trajectory_html(traj, out / f"trajectory_{name}.html"))
    if not written:
        raise ValueError("nothing to plot: give --eval eval.json and/or --model ... --prompt TEXT")
    for w in written:
        print(f"written: {w}")
    return 0
