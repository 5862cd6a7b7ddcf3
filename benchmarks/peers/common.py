"""Workload constants, timing statistics and equality checks shared by the peer benchmarks.

Nothing here imports a peer tool: the main ``.venv`` (no peers installed) runs its tests.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

#: Largest max-abs difference accepted between tools on the compared outputs.
TOLERANCE = 1e-3

BATCH, SEQ = 8, 64
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"

#: Per-layer sites of the cache-all workload: the residual stream and the attention sites every tool reaches
#: (nnsight and HF hooks read them at module boundaries; ``hook_pattern`` needs eager attention there).
CACHE_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
               "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern")


def cache_names(n_layers: int) -> list[str]:
    """Full TL names of the cache-all workload, in forward order."""
    return [f"blocks.{layer}.{site}" for layer in range(n_layers) for site in CACHE_SITES]


@dataclass
class Stats:
    """Wall-clock samples of one timed run, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_robin(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, Stats]:
    """Time every function once per round, ``warmup`` untimed rounds first.

    Interleaving the variants makes drift in machine load hit them alike.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    stats = {k: Stats() for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            stats[k].samples.append(timed(fn))
    return stats


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, after reshaping ``a`` to ``b``'s shape (same element count required).

    Peers return some sites flattened (``q_proj`` output ``[B, S, H*D]`` vs TL's ``[B, S, H, D]``).
    """
    if a.numel() != b.numel():
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return (a.detach().float().reshape(b.shape) - b.detach().float()).abs().max().item()


def max_abs_dict(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """Worst max-abs difference over the reference's keys, and the key where it occurs.

    A key missing from ``got`` raises ``KeyError`` naming it.
    """
    missing = [k for k in ref if k not in got]
    if missing:
        raise KeyError(f"{len(missing)} sites missing, e.g. {missing[:3]}")
    worst, where = 0.0, ""
    for k, r in ref.items():
        d = max_abs(got[k], r)
        if d > worst or not where:
            worst, where = d, k
    return worst, where


def error_text(exc: BaseException) -> str:
    """``Type: message`` plus the innermost frame, one line, for the results table."""
    frames = traceback.extract_tb(exc.__traceback__)
    at = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}{at}"
