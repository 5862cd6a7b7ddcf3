"""Activation patching sweeps in the TransformerLens style, run batched.

Every function takes ``(model, corrupted_tokens, clean_cache, patching_metric)`` like
TransformerLens' ``patching`` module and returns a tensor of its shape (e.g. ``[n_layers,
pos]``). A cell patches one site (and position / head) of the corrupted run with the clean
activation, or with any :class:`~fxlens.interventions.patches.Patch` given as ``patch=``
(zero, mean, resample ablation sweeps).

``schedule`` picks the execution:

* ``"loop"``: one forward per cell (the reference);
* ``"batched"``: the cells ride the batch dimension, per-row patch masks in one hooked
  graph, chunked to ``batch_size`` rows;
* ``"wavefront"``: one pass over the blocks, cells joining at their block from the cached
  corrupted residual stream (:mod:`fxlens.interventions.wavefront`); sites outside
  blocks fall back to ``"batched"``;
* ``"auto"`` (default): ``"wavefront"`` where the graph can be cut into blocks.

Batched schedules skip cells whose clean and corrupted activations are equal (e.g. the
shared prefix of an IOI pair): their value is the corrupted metric. ``patching_metric``
receives logits ``[batch, pos, vocab]``; with ``logits_at`` (e.g. ``-1``) it receives only
those positions (``[batch, len(logits_at), vocab]``) and the batched schedules unembed only
them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import torch

from ..cache import ActivationCache
from ..head_results import is_result
from ..tracer.sites import layer_of
from .patches import Patch, ReplacePatch, region_mask, site_dims
from .ranks import Share, float_key, key_of, resolve
from .wavefront import Cell, GroupHooks, Segments, apply_cell, run_wavefront

log = logging.getLogger("fxlens.patching")

Metric = Callable[[torch.Tensor], torch.Tensor | float]


def _positions(n_pos: int, positions: Sequence[int] | None) -> list[int]:
    """``positions`` (negative ones counted from the end) checked against ``n_pos``; ``None``: all."""
    if positions is None:
        return list(range(n_pos))
    out = [p + n_pos if p < 0 else p for p in positions]
    bad = [p for p, q in zip(positions, out) if not 0 <= q < n_pos]
    if bad or not out or len(set(out)) != len(out):
        raise ValueError(f"positions must be distinct indices into {n_pos} positions; got {list(positions)}")
    return out


def _cells(model, x_like: dict[str, torch.Tensor], sites: Sequence[str], by_pos: bool, by_head: bool,
           patch: Patch | None, clean_cache: ActivationCache | None,
           positions: Sequence[int] | None = None) -> tuple[list[Cell], tuple[int, ...]]:
    cells, shape = [], None
    for site in sites:
        x = x_like[site]
        dims = site_dims(site)
        pos_ax = next((i for i, d in enumerate(dims) if d in ("pos", "q_pos")), 1)  # patterns: [b, h, q, k]
        pos = _positions(x.shape[pos_ax], positions)
        head_ax = next((i for i, d in enumerate(dims) if d in ("n_heads", "n_kv_heads")), None)
        n_heads = x.shape[head_ax] if head_ax is not None else None
        if by_head and n_heads is None:
            raise ValueError(f"by_head needs a head dim; {site} has none")
        if patch is None:
            if clean_cache is None or site not in clean_cache:
                raise KeyError(f"clean_cache has no {site}; cache it (run_with_cache names_filter) or pass patch=")
            op = ReplacePatch(value=clean_cache[site]).op
        else:
            op = patch.op
        grid = [(p, h) for p in (pos if by_pos else [None]) for h in (range(n_heads) if by_head else [None])]
        shape = (len(sites), *((len(pos),) if by_pos else ()), *((n_heads,) if by_head else ()))
        for p, h in grid:
            cells.append(Cell(site, region_mask(x, site, pos=p, head=h), op))
    return cells, shape


def _metric_value(metric: Metric, logits: torch.Tensor) -> float:
    v = metric(logits)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"patching_metric must return a scalar; got shape {tuple(v.shape)}")
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"patching_metric must return a number or a 1-element tensor, not {type(v).__name__}")
    return float(v)


def _unchanged(cell: Cell, clean: torch.Tensor, corrupt: torch.Tensor) -> bool:
    """Whether replacing the cell's region with the clean activation changes nothing."""
    if cell.mask is None:
        return torch.equal(clean, corrupt)
    return bool(torch.where(cell.mask, clean, corrupt).eq(corrupt).all())


def _logit_positions(n_pos: int, logits_at: int | Sequence[int] | None) -> torch.Tensor:
    if logits_at is None:
        return torch.arange(n_pos)
    at = [logits_at] if isinstance(logits_at, int) else list(logits_at)
    bad = [p for p in at if not isinstance(p, int) or not -n_pos <= p < n_pos]
    if bad or not at:
        raise ValueError(f"logits_at must be positions in [-{n_pos}, {n_pos}); got {logits_at!r}")
    return torch.arange(n_pos)[torch.as_tensor(at)]


def _clean_cache(model, clean, sites, patch, ids, mask, clean_mask):
    """The clean activations of ``sites``, checked against the corrupted run's shapes."""
    if patch is not None:
        return None
    if isinstance(clean, torch.Tensor):  # clean token ids: cache them with their own mask
        clean_ids = clean.to(ids.device)
        clean_ids = clean_ids[None] if clean_ids.dim() == 1 else clean_ids
        if clean_mask is None and not bool(mask.all()):
            raise ValueError("the corrupted run is padded (attention_mask has zeros) but no clean_attention_mask "
                             "was given for the clean tokens: pass clean_attention_mask=")
        clean = model.run_with_cache(clean_ids, names_filter=sites, attention_mask=clean_mask)[1]
    if clean is None:
        raise ValueError("give a clean cache (or clean token ids), or patch= for an ablation sweep")
    return clean


def patch_sweep(model, corrupted_tokens: torch.Tensor, clean_cache: ActivationCache | torch.Tensor | None,
                patching_metric: Metric, sites: Sequence[str], positions: Sequence[int] | None = None, *,
                by_pos: bool = True, by_head: bool = False,
                patch: Patch | None = None, schedule: str = "auto", batch_size: int = 512,
                logits_at: int | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
                clean_attention_mask: torch.Tensor | None = None,
                progress: bool = True, max_memory: int | str | None = None,
                compile: bool | None = None, ranks: object = "auto") -> torch.Tensor:
    """Patch each cell of ``sites`` (x position if ``by_pos``, x head if ``by_head``) into the corrupted run.

    Every schedule honours the hooks active on the model (``add_hook``, ``with model.patch``,
    ``with model.hooks``): each variant runs them as a one-forward-per-cell loop would, then its patch.

    Args:
        model: a :class:`~fxlens.HookedModel`.
        corrupted_tokens: ``[batch, pos]`` token ids of the corrupted run.
        clean_cache: clean activations of every site in ``sites`` (same shapes), or the clean token ids
            (``[batch, pos]``, cached here); unused with ``patch=``.
        patching_metric: ``logits -> scalar``.
        sites: full site names, one result row each.
        positions: with ``by_pos``, the positions to sweep (default all; negative counts from the end);
            the result's position axis follows their order.
        by_pos: one cell per position (else the whole site at once).
        by_head: one cell per head (sites with a head dim, e.g. ``attn.hook_z``).
        patch: write ``patch.op(x)`` instead of the clean activation (ablation sweeps).
        schedule: ``"auto"``, ``"wavefront"``, ``"batched"`` or ``"loop"`` (see the module docstring).
            ``"auto"`` runs the wavefront where the graph can be cut into blocks and every site is inside
            a block, else ``"batched"``; the schedule that ran is logged (logger ``fxlens.patching``).
        batch_size: most rows (cells x batch) per forward.
        max_memory: activation budget per forward, in bytes or as ``"2GB"`` / ``"512MiB"``; lowers
            ``batch_size`` to :func:`rows_for_memory` rows.
        logits_at: positions whose logits the metric reads (``None``: all).
        attention_mask: mask of the corrupted run (default: all ones).
        clean_attention_mask: mask of the clean tokens, when ``clean_cache`` is token ids (required when
            the corrupted run is padded).
        progress: show a tqdm bar.
        compile: ``torch.compile`` the wavefront's block segments (default: ``model.compile``). The
            batched and loop schedules run the model's own graphs, compiled when the model was
            loaded with ``compile=True``; asking them for ``compile=True`` otherwise raises.
        ranks: ``"auto"`` (default) splits the cells over the ranks of a ``torch.distributed`` run
            (``torchrun``; the group is initialised from its variables if none is) and every rank returns
            the full result, equal to the single-process one; a ``ProcessGroup`` splits over that group;
            ``None`` computes every cell here (:mod:`fxlens.interventions.ranks`).

    Returns:
        ``[len(sites), (len(positions)), (n_heads)]`` metric values.
    """
    ids = torch.as_tensor(corrupted_tokens, device=model.device)
    ids = ids[None] if ids.dim() == 1 else ids
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device)
    if isinstance(sites, str):
        raise TypeError("sites must be a list of site names (one result row each), not a single string")
    sites = list(sites)
    model.resolve(sites)
    if positions is not None and not by_pos:
        raise ValueError("positions= selects the positions of a by_pos sweep; by_pos=False patches whole sites")
    if schedule not in ("auto", "wavefront", "batched", "loop"):
        raise ValueError(f"schedule must be 'auto', 'wavefront', 'batched' or 'loop', not {schedule!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, not {batch_size!r}")
    compile = _check_compile(model, compile, schedule)
    keep = _logit_positions(ids.shape[1], logits_at).to(ids.device)
    if max_memory is not None:
        batch_size = min(batch_size, rows_for_memory(model, ids.shape[1], len(keep), max_memory))
    clean_cache = _clean_cache(model, clean_cache, sites, patch, ids, mask, clean_attention_mask)
    corrupt_logits, corrupt = corrupted_run(model, ids, mask, sites, clean_cache)
    cells, shape = _cells(model, dict(corrupt), sites, by_pos, by_head, patch, clean_cache, positions)
    results = run_cells(model, ids, mask, cells, patching_metric, corrupt_logits, corrupt,
                        None if patch is not None else clean_cache, schedule=schedule, batch_size=batch_size,
                        keep=keep, progress=progress, compile=compile, ranks=ranks)
    return results.reshape(shape)


def _check_compile(model, compile: bool | None, schedule: str) -> bool:
    compile = model.compile if compile is None else compile
    if compile and not model.compile and schedule in ("batched", "loop"):
        raise ValueError(f"compile=True with schedule={schedule!r} runs the model's own graphs: load the model "
                         "with compile=True (or use the wavefront schedule)")
    return compile


def corrupted_run(model, ids: torch.Tensor, mask: torch.Tensor, sites: Sequence[str],
                  clean_cache: ActivationCache | None) -> tuple[torch.Tensor, ActivationCache]:
    """The corrupted run's logits and cache (``sites`` and every residual site), clean shapes checked."""
    n = model.cfg.n_layers
    resid_names = [f"blocks.{L}.hook_resid_{w}" for L in range(n) for w in ("pre", "post")]
    want = list(dict.fromkeys([*sites, *resid_names]))
    with torch.no_grad():
        corrupt_logits, corrupt = model.run_with_cache(ids, names_filter=want, attention_mask=mask)
    for site in sites if clean_cache is not None else ():
        if site not in clean_cache:
            raise KeyError(f"clean_cache has no {site}; cache it (run_with_cache names_filter) or pass patch=")
        if tuple(clean_cache[site].shape) != tuple(corrupt[site].shape):
            raise ValueError(f"clean {site} has shape {tuple(clean_cache[site].shape)} but the corrupted run's "
                             f"is {tuple(corrupt[site].shape)}: clean and corrupted inputs need the same batch "
                             "size and number of tokens")
    return corrupt_logits, corrupt


def run_cells(model, ids: torch.Tensor, mask: torch.Tensor, cells: list[Cell], patching_metric: Metric,
              corrupt_logits: torch.Tensor, corrupt: ActivationCache, clean_cache: ActivationCache | None, *,
              schedule: str = "auto", batch_size: int = 512, keep: torch.Tensor | None = None,
              progress: bool = True, compile: bool = False, ranks: object = "auto") -> torch.Tensor:
    """The metric of every cell (flat ``[len(cells)]``) on the chosen schedule.

    With ``clean_cache``, cells whose clean and corrupted values agree are answered exactly with the
    corrupted metric, without compute (their op must be "write the clean value"). ``ranks``: see
    :func:`patch_sweep`; each rank computes whole chunks (forwards) of the schedule.
    """
    keep = torch.arange(ids.shape[1], device=ids.device) if keep is None else keep
    base_value = _metric_value(patching_metric, corrupt_logits[:, keep])
    group = resolve(ranks, ids.device)
    progress = progress and (group is None or group.rank == 0)
    key = [*key_of(ids, mask, keep), float_key(base_value), [c.site for c in cells], schedule]
    results = torch.full((len(cells),), float("nan"))
    user: dict[str, list] = {}
    for site, fn in model.active_hooks("fwd"):
        user.setdefault(site, []).append(fn)
    results_hooked = [s for s in user if is_result(s)]
    if results_hooked and schedule != "loop":
        raise ValueError(f"hooks at {results_hooked} are active: attn.hook_result is not a graph site, so only "
                         "schedule='loop' runs them in a sweep (or hook attn.hook_z per head instead)")

    if schedule == "loop":
        log.info("patch_sweep: schedule=loop, %d cells", len(cells))
        share = Share(group, len(cells), [[i] for i in range(len(cells))], [1.0] * len(cells), key)

        def one(chunk: list[int]) -> None:
            cell = cells[chunk[0]]
            with torch.no_grad():
                logits = model.run_with_hooks(ids, fwd_hooks=[(cell.site, lambda x, hook: apply_cell(cell, x))],
                                              attention_mask=mask)
            results[chunk[0]] = _metric_value(patching_metric, logits[:, keep])
        return share.compute(results, one, progress=progress, desc="patching (loop)")

    todo = []
    for i, cell in enumerate(cells):
        if clean_cache is not None and _unchanged(cell, clean_cache[cell.site], corrupt[cell.site]):
            results[i] = base_value
        else:
            todo.append(i)
    segments, why = None, "every cell is answered without compute" if not todo else ""
    if todo and schedule in ("auto", "wavefront"):
        outside = sorted({cells[i].site for i in todo if layer_of(cells[i].site) is None})
        if outside:
            why = f"{outside} are outside the blocks"
        else:
            hooked = frozenset({cells[i].site for i in todo if not cells[i].direct}
                               | {s for s in user if not s.endswith(("hook_resid_pre", "hook_resid_post"))
                                  and (layer_of(s) is not None or s.startswith("ln_final"))})
            try:
                segments = model.memo(("segments", hooked, compile), lambda: Segments(model, hooked, compile))
            except ValueError as e:
                why = str(e)
        if segments is None and schedule == "wavefront":
            raise ValueError(f"schedule='wavefront' cannot run: {why}; use schedule='batched'")
        if segments is None and todo:
            log.warning("patch_sweep: schedule='auto' runs 'batched' because the wavefront cannot: %s", why)
    ran = "wavefront" if segments is not None else "batched"
    log.info("patch_sweep: schedule=%s, %d cells, %d computed, %d answered exactly without compute",
             ran, len(cells), len(todo), len(cells) - len(todo))
    b = ids.shape[0]
    per_chunk = max(1, batch_size // b)
    if segments is not None:
        todo.sort(key=lambda i: cells[i].join)
    chunks = [todo[j:j + per_chunk] for j in range(0, len(todo), per_chunk)]
    n = model.cfg.n_layers
    costs = [float(sum(n + 1 - cells[i].join for i in c)) if segments is not None else float(len(c)) for c in chunks]
    share = Share(group, len(cells), chunks, costs, [*key, ran, b])

    def chunk_values(chunk: list[int]) -> None:
        variants = [cells[i] for i in chunk]
        if segments is not None:
            logits = run_wavefront(model, segments, variants, ids, mask, corrupt, keep, user)
        else:
            logits = _run_batched(model, variants, ids, mask, user)[:, keep]
        for j, i in enumerate(chunk):
            results[i] = _metric_value(patching_metric, logits[j * b:(j + 1) * b])
    return share.compute(results, chunk_values, progress=progress, desc=f"patching ({ran})")


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(size: int | str) -> int:
    """``2_000_000``, ``"2MB"``, ``"1.5 GiB"`` -> bytes."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_memory must be a number of bytes (int) or a string like '2GB', not {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_memory must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).lower() not in _UNITS | {"": 1}:
        raise ValueError(f"cannot read a memory size from {size!r} (use bytes or e.g. '2GB', '512MiB')")
    out = int(float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1))
    if out <= 0:
        raise ValueError(f"max_memory must be positive, not {size!r}")
    return out


def rows_for_memory(model, n_pos: int, n_logit_pos: int, max_memory: int | str) -> int:
    """Batch rows whose activations fit in ``max_memory`` (at least 1).

    Per row, the live tensors of one block (residual, q/k/v, attention pattern, MLP hidden) plus
    the unembedded positions: ``itemsize * (pos * (4 d_model + 3 d_mlp + n_heads pos) + 2 n_logit_pos d_vocab)``.
    """
    c = model.cfg
    itemsize = torch.finfo(c.dtype).bits // 8
    row = itemsize * (n_pos * (4 * c.d_model + 3 * c.d_mlp + c.n_heads * n_pos) + 2 * n_logit_pos * c.d_vocab)
    return max(1, parse_bytes(max_memory) // row)


def _run_batched(model, cells: list[Cell], ids: torch.Tensor, mask: torch.Tensor,
                 user: dict[str, list]) -> torch.Tensor:
    """All ``cells`` as row groups of one forward: per group, the active hooks then the cell's patch."""
    hooks = GroupHooks(model, user, ids.shape[0])
    for g, cell in enumerate(cells):
        hooks.place(g, cell)
    sites = {*user, *(c.site for c in cells)}
    n = len(cells)
    with torch.no_grad():
        return model.run(ids.repeat(n, 1), attention_mask=mask.repeat(n, 1), use_model_hooks=False,
                         fwd_hooks=[(s, lambda x, hook: hooks.apply(hook.name, x)) for s in sites]).out
