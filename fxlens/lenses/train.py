"""Train a tuned lens: KL(final logits || lens logits), summed over layers, from one cached forward per batch.

The recipe is tuned-lens 0.2's (Belrose et al. 2023): SGD with Nesterov momentum, learning rate
scaled by ``1 - momentum``, weight decay, linear warm-up then linear decay, gradients clipped to
norm 1. Each step runs the model once per micro-batch with only the residual sites cached
(``run_with_cache``, no autograd through the model). All layers are translated and normalised in one
batched graph; the unembedding, softmax and KL gradient are computed block by block outside
autograd (:mod:`.fused`: one ``[rows, d_vocab]`` buffer, the target entering only through ``pᵀW``),
and a single backward takes that gradient into the translators. Soft-capped models (Gemma 2/3)
backpropagate each layer's fused KL through autograd instead.

Data parallel: under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on GPU; call
:func:`init_distributed`) every rank takes an equal slice of each global batch and gradients are
summed across ranks before the step: the same lens as one process, up to float summation order.
Checkpoints (every ``checkpoint_every`` steps, written atomically) hold the translators, optimiser
and schedule state and the step; ``resume=True`` continues from the last one exactly as if
the run had never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import TokenChunks
from .fused import DEFAULT_ROWS, FusedUnembed, supported
from .logit_lens import residual_stream
from .tuned_lens import TunedLens

CHECKPOINT = "checkpoint.pt"
# Fields that change the trajectory: a checkpoint only resumes under the same values.
_TRAJECTORY = ("steps", "batch_size", "lr", "momentum", "weight_decay", "warmup_steps", "max_grad_norm", "seed",
               "bf16_unembed")


@dataclass
class TrainConfig:
    """Tuned-lens training settings (defaults: the reference recipe, scaled down for CPU).

    Each attribute's docstring is the help text of the matching ``fxlens lens train`` option.
    """

    steps: int = 250
    """Optimiser steps (the reference trains 250 steps of 2^18 tokens)."""
    batch_size: int = 16
    """Sequences per step over all processes (tokens per step = batch_size x sequence length)."""
    micro_batch: int = 4
    """Sequences per forward pass on each process (gradient accumulation inside a step)."""
    lr: float = 1.0
    """Learning-rate scale; SGD's actual rate is lr x (1 - momentum) (tuned-lens' convention)."""
    momentum: float = 0.9
    """Nesterov momentum."""
    weight_decay: float = 1e-3
    """Weight decay (pulls translators towards zero, i.e. the lens towards the logit lens)."""
    warmup_steps: int | None = None
    """Linear warm-up steps before the linear decay to zero (default: 10% of steps)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    seed: int = 0
    """Seed of the data order: the same seed gives the same lens."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0 only)."""
    bf16_unembed: bool = False
    """Run the unembedding matmuls in bfloat16 (softmax, KL and accumulation stay float32): about 2-4x
    faster on CPUs with AVX-512 BF16 / AMX and on GPUs; the lens is within 0.02 bits/byte of float32."""
    unembed_rows: int = DEFAULT_ROWS
    """Rows of lens logits computed at once (memory: rows x d_vocab x 4 bytes)."""

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("micro_batch", 1), ("warmup_steps", 0),
                          ("checkpoint_every", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is None and name == "warmup_steps":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, not {value!r} "
                                 f"(--{name.replace('_', '-')})")

    def warmup(self) -> int:
        return max(1, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


@dataclass
class TrainResult:
    """What :func:`train_lens` returns."""

    lens: TunedLens
    losses: list[list[float]] = field(default_factory=list)
    """Per step, the mean KL (nats/token) of every layer 0..n_layers-1."""
    tokens_per_second: float = 0.0
    """Training throughput of this run (all processes' tokens / wall time of the steps run)."""
    steps_run: int = 0


class _CrossEntropyToTarget(torch.autograd.Function):
    """Per-row ``logsumexp(z) - p . z`` = KL(p || softmax z) - (-H(p)), fused.

    Saves only ``z``; the backward writes ``(softmax z - p) * g`` into one new buffer
    instead of autograd's chain of log_softmax / mul / sum temporaries over the vocabulary.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=-1)
        pz = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).view(-1)
        ctx.save_for_backward(z, p, lse)
        return lse - pz

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, p, lse = ctx.saved_tensors
        grad = torch.sub(z, lse.unsqueeze(-1)).exp_().sub_(p).mul_(g.unsqueeze(-1))
        return grad, None


def kl_to_target(lens_logits: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p || softmax(lens_logits)) for ``[T, V]`` logits, ``[T, V]`` target probs and
    ``[T]`` target ``sum p log p``; differentiable in ``lens_logits``."""
    return _CrossEntropyToTarget.apply(lens_logits.float(), p) + neg_entropy


def _micro_step(lens: TunedLens, cfg: TrainConfig) -> Callable[[torch.Tensor, list[torch.Tensor], int], torch.Tensor]:
    """``step(final_logits [T, V], stream, tokens_per_step) -> per-layer KL sums [n_layers]``: accumulates
    the gradient of ``sum(KL) / tokens_per_step`` into the translators."""
    unembed, n = lens.unembed, lens.n_layers
    if supported(unembed):
        fused = FusedUnembed(unembed, bf16=cfg.bf16_unembed, rows=cfg.unembed_rows)

        def step(logits, stream, tokens_per_step):
            target = fused.target(logits)
            hs = torch.stack([h.to(fused.device) for h in stream]).flatten(1, -2)  # [L, T, d]
            x = unembed.normalize(lens.transform_layers(hs))
            grad = torch.empty(x.shape, device=fused.device)
            kl = torch.empty(n, device=fused.device)
            for i in range(n):
                k, grad[i] = fused.kl(x[i], target, grad=True)
                kl[i] = k.sum()
            x.backward(grad.div_(tokens_per_step).to(x.dtype))
            return kl

        return step

    autocast = torch.autocast(unembed.weight.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_unembed)

    def step_softcap(logits, stream, tokens_per_step):
        logp = torch.log_softmax(logits.to(unembed.weight.device).float(), dim=-1)
        p = logp.exp()
        neg_h = (p * logp).sum(-1)
        kl = torch.empty(n)
        for i in range(n):
            with autocast:
                z = lens(stream[i], i).flatten(0, 1)
            k = kl_to_target(z, p, neg_h)
            (k.sum() / tokens_per_step).backward()
            kl[i] = k.detach().sum().cpu()
        return kl

    return step_softcap


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun set up (no-op outside torchrun); returns ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FXLENS_DIST_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return rank_world()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_indices(step: int, n_chunks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Chunk indices of the global batch of ``step``: a fresh seeded permutation per epoch."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n_chunks)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n_chunks, generator=g)[i]))
    return torch.tensor(out)


def _optimizer(lens: TunedLens, cfg: TrainConfig):
    params = [p for p in lens.layer_translators.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr * (1 - cfg.momentum), momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    warm, total = cfg.warmup(), cfg.steps

    def schedule(s: int) -> float:  # linear warm-up, then linear decay to 0 (transformers' schedule)
        if s < warm:
            return (s + 1) / (warm + 1)
        return max(0.0, (total - s) / max(1, total - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _data_hash(chunks: TokenChunks) -> str:
    return hashlib.sha256(chunks.tokens.numpy().tobytes()).hexdigest()[:16]


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: TrainConfig, chunks: TokenChunks) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        stored = state["config"]
    except Exception as e:  # truncated by a kill during an older, non-atomic save; not a checkpoint at all
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}): it is truncated or not an "
                         "fxlens checkpoint; delete it to train from the start") from e
    defaults = TrainConfig()  # checkpoints older than a field were written with its default
    theirs = {k: stored.get(k, getattr(defaults, k)) for k in _TRAJECTORY}
    diff = {k: (theirs[k], getattr(cfg, k)) for k in _TRAJECTORY if theirs[k] != getattr(cfg, k)}
    if diff:
        raise ValueError(f"checkpoint {path} was written with other settings {diff} (checkpoint, now); "
                         "resume with the same settings or start a new --out folder")
    if state["data"] != _data_hash(chunks):
        raise ValueError(f"checkpoint {path} was trained on other data (token hash differs): pass the same --text")
    return state


@torch.enable_grad()
def train_lens(model, chunks: TokenChunks, config: TrainConfig | None = None, *, lens: TunedLens | None = None,
               out: str | Path | None = None, resume: bool = False,
               callback: Callable[[int, TrainResult], None] | None = None) -> TrainResult:
    """Train a tuned lens on ``chunks`` (see :func:`fxlens.lenses.data.tokenize_chunks`).

    Args:
        model: traced :class:`fxlens.HookedModel`; it is not modified.
        chunks: training token chunks.
        config: :class:`TrainConfig` (defaults if None).
        lens: lens to train (default: a fresh zero-initialised :class:`TunedLens`).
        out: folder for checkpoints and the final lens (``config.json`` + ``params.safetensors``).
        resume: continue from ``out/checkpoint.pt`` if it exists.
        callback: called as ``callback(step, result)`` after every completed step (``step`` counts
            from 1); an exception it raises stops training like a kill (the last checkpoint stays).

    Returns:
        :class:`TrainResult` with the lens, per-step per-layer KL and throughput.
    """
    cfg = config or TrainConfig()
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    lens = lens if lens is not None else TunedLens(model)
    n = lens.n_layers
    opt, sched = _optimizer(lens, cfg)
    result = TrainResult(lens)
    out = Path(out) if out is not None else None
    ckpt = out / CHECKPOINT if out is not None else None
    start = 0
    if resume:
        if ckpt is None:
            raise ValueError("resume needs out= (the folder holding checkpoint.pt)")
        if ckpt.exists():
            state = _load_checkpoint(ckpt, cfg, chunks)
            lens.layer_translators.load_state_dict(state["lens"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start, result.losses = int(state["step"]), [list(x) for x in state["losses"]]
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    local = cfg.batch_size // world
    seq = chunks.seq_len
    tokens_per_step = cfg.batch_size * seq
    device = lens.unembed.weight.device
    params = [p for p in lens.layer_translators.parameters() if p.requires_grad]
    micro_step = _micro_step(lens, cfg)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="tuned lens",
               disable=not cfg.progress or rank != 0, unit="step")
    t0 = time.perf_counter()
    for step in bar:
        idx = batch_indices(step, len(chunks), cfg.batch_size, cfg.seed)[rank * local:(rank + 1) * local]
        layer_kl = torch.zeros(n, dtype=torch.float64)
        for mb in idx.split(cfg.micro_batch):
            logits, stream = residual_stream(model, chunks.tokens[mb], final=False)
            step_kl = micro_step(logits.flatten(0, 1), stream, tokens_per_step)
            layer_kl += step_kl.double().cpu()
            del logits, stream
        if world > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            offset = 0
            for prm in params:
                prm.grad.copy_(flat[offset:offset + prm.numel()].view_as(prm))
                offset += prm.numel()
            layer_kl = layer_kl.to(device)
            dist.all_reduce(layer_kl)
            layer_kl = layer_kl.cpu()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=False)
        sched.step()
        result.losses.append((layer_kl / tokens_per_step).tolist())
        result.steps_run += 1
        done = step + 1
        if rank == 0:
            bar.set_postfix(kl=f"{sum(result.losses[-1]) / n:.3f}", refresh=False)
            if ckpt is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                _save_checkpoint(ckpt, {
                    "step": done, "lens": lens.layer_translators.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "losses": result.losses, "data": _data_hash(chunks),
                    "config": {k: v for k, v in dataclasses.asdict(cfg).items()}})
        result.tokens_per_second = result.steps_run * tokens_per_step / (time.perf_counter() - t0)
        if callback is not None:
            callback(done, result)
    bar.close()
    if out is not None and rank == 0:
        lens.save(out)
    return result
