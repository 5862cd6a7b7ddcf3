"""Sweeps across ranks: a sweep's chunks split over a ``torch.distributed`` group, one result gathered.

Under ``torchrun --nproc_per_node=N script.py`` (or in any initialised process group) a patching
sweep gives each rank whole chunks of its own schedule, the very forwards a single process runs
(same cells, same rows per forward), so every cell's value is the single-process value bit for
bit; the values are gathered and every rank returns the full, identical result.

``ranks=`` on :func:`~fxlens.interventions.sweep.patch_sweep` (and every ``get_act_patch_*``):

* ``"auto"`` (default): split over the default group if one is initialised; if none is but the
  torchrun variables say ``WORLD_SIZE > 1``, initialise it (``gloo`` for a CPU model, ``nccl``
  for a CUDA one; logged); else run in this process alone;
* a ``ProcessGroup``: split over that group;
* ``None``: no split (each rank computes every cell).

Every rank must call the sweep with the same model and arguments. The ranks check that they
agree on the corrupted run (inputs, metric value) and on the plan of chunks before any cell is
computed, and raise on every rank if not; a rank whose cells fail makes every rank raise.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

log = logging.getLogger("fxlens.patching")


@dataclass(frozen=True)
class Group:
    """The process group a sweep splits over, this process's rank in it and its size."""

    group: object | None
    rank: int
    world: int
    device: torch.device  # where collectives' tensors live (CUDA for nccl)


def resolve(ranks: object, model_device: torch.device) -> Group | None:
    """The group for ``ranks=`` (see the module docstring); ``None``: a single-process sweep."""
    if ranks is None:
        return None
    if isinstance(ranks, str):
        if ranks != "auto":
            raise ValueError(f"ranks must be 'auto', None or a torch.distributed ProcessGroup, not {ranks!r}")
        if not dist.is_available():
            return None
        if not dist.is_initialized() and not _init_from_env(model_device):
            return None
        group = None
    elif dist.is_available() and isinstance(ranks, dist.ProcessGroup):
        group = ranks
    else:
        raise ValueError(f"ranks must be 'auto', None or a torch.distributed ProcessGroup, not {ranks!r}")
    world = dist.get_world_size(group)
    if world == 1:
        return None
    backend = str(dist.get_backend(group))
    device = model_device if backend == "nccl" else torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group's backend is nccl but the model is on {device}: use gloo for CPU "
                         "models (or move the model to this rank's GPU)")
    return Group(group, dist.get_rank(group), world, device)


def _init_from_env(model_device: torch.device) -> bool:
    """Initialise the default group from torchrun's variables when ``WORLD_SIZE > 1``; whether it did."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} is set but {missing} are not: launch with torchrun, initialise "
                           "the process group yourself, or pass ranks=None")
    backend = "nccl" if model_device.type == "cuda" else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if model_device.index is not None and model_device.index != local:
            log.warning("patch_sweep: LOCAL_RANK=%d but the model is on %s (load it on cuda:LOCAL_RANK so the "
                        "ranks do not share a GPU)", local, model_device)
        torch.cuda.set_device(model_device)
    dist.init_process_group(backend)
    log.info("patch_sweep: initialised a %s process group from the torchrun environment (rank %d of %d)",
             backend, dist.get_rank(), world)
    return True


def owners(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each chunk: costliest first, each to the least-loaded rank (ties: lowest rank, then
    lowest chunk index), so the split is deterministic and every chunk has exactly one rank."""
    if world < 1:
        raise ValueError(f"world must be at least 1, not {world}")
    load, out = [0.0] * world, [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[j] = r
        load[r] += costs[j]
    return out


class Share:
    """This rank's chunks of a sweep, and the gather of every rank's values into one result.

    Args:
        group: from :func:`resolve` (``None``: this process computes every chunk).
        n_cells: cells of the sweep (the result's length).
        chunks: cell indices of each forward, in the schedule's order.
        costs: relative cost of each chunk (e.g. block-rows it runs).
        key: what every rank must agree on (inputs, corrupted metric, schedule).
    """

    def __init__(self, group: Group | None, n_cells: int, chunks: list[list[int]], costs: Sequence[float],
                 key: Sequence[object]):
        self.group, self.n_cells, self.chunks = group, n_cells, chunks
        flat = [i for c in chunks for i in c]
        if len(set(flat)) != len(flat) or not all(0 <= i < n_cells for i in flat) or len(costs) != len(chunks):
            raise ValueError("the chunks of a sweep must be disjoint cell indices, one cost each")
        world = group.world if group is not None else 1
        self.owner = owners(costs, world)
        if group is None:
            return
        fingerprint = zlib.crc32(repr((n_cells, chunks, list(key))).encode())
        mine = torch.tensor([fingerprint, n_cells, len(chunks)], dtype=torch.int64, device=group.device)
        seen = _all_gather(group, mine)
        if not all(torch.equal(s, seen[0]) for s in seen):
            raise RuntimeError("patch_sweep: the ranks disagree on the sweep (cells, chunks, inputs or the corrupted "
                               "run's metric): call it with the same model, inputs and arguments on every rank "
                               "(models built from random weights need the same seed)")
        log.info("patch_sweep: rank %d of %d computes %d of %d chunks", group.rank, world, len(self.mine()),
                 len(chunks))
        busy = len(set(self.owner))
        if busy < world and group.rank == 0:
            log.warning("patch_sweep: %d chunks for %d ranks, %d ranks idle: lower batch_size to give every rank "
                        "a chunk", len(chunks), world, world - busy)

    def mine(self) -> list[list[int]]:
        """The chunks this rank computes."""
        rank = self.group.rank if self.group is not None else 0
        return [c for c, r in zip(self.chunks, self.owner) if r == rank]

    def compute(self, results: torch.Tensor, fill: Callable[[list[int]], None], progress: bool = True,
                desc: str = "") -> torch.Tensor:
        """``fill(chunk)`` (writing ``results``) for this rank's chunks, then :meth:`gather`."""
        try:
            for chunk in tqdm(self.mine(), disable=not progress, desc=desc):
                fill(chunk)
        except Exception as e:  # the other ranks must hear of it, not wait for this rank's values
            if self.group is None:
                raise
            return self.gather(results, e)
        return self.gather(results)

    def gather(self, results: torch.Tensor, error: BaseException | None = None) -> torch.Tensor:
        """Every rank's values of its own chunks; cells in no chunk (answered without compute) from rank 0.

        ``error``: this rank's failure, re-raised here after the ranks have met, so that none waits forever.
        """
        if self.group is None:
            if error is not None:
                raise error
            return results
        g = self.group
        flat = torch.cat([results, torch.tensor([1.0 if error is not None else 0.0], dtype=results.dtype)])
        seen = torch.stack(_all_gather(g, flat.to(g.device))).cpu()
        failed = [r for r in range(g.world) if seen[r, -1] != 0]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"patch_sweep: rank(s) {failed} failed computing their cells (see their error)")
        who = torch.zeros(self.n_cells, dtype=torch.long)
        for chunk, r in zip(self.chunks, self.owner):
            who[torch.tensor(chunk, dtype=torch.long)] = r
        return seen[who, torch.arange(self.n_cells)].to(results.dtype)


def _all_gather(g: Group, x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(g.world)]
    dist.all_gather(out, x, group=g.group)
    return out


def key_of(*tensors: torch.Tensor) -> list[int]:
    """A checksum of each tensor's values (what the ranks must agree on)."""
    out = []
    for t in tensors:
        t = t.detach().cpu().contiguous()
        out.append(zlib.crc32(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"") ^ t.numel())
    return out


def float_key(x: float) -> int:
    """``x``'s bits, so the ranks' values must agree exactly."""
    return struct.unpack("<q", struct.pack("<d", x))[0]
