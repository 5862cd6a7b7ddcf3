"""The in-process timed workloads: plain forward, cache-all, IOI ``resid_pre`` patching sweep.

Each candidate is first run once and checked against the workload's reference (max-abs difference of
the compared outputs, :data:`peers.common.TOLERANCE`); a candidate that raises is recorded with its
error and left out of the timing. All runs are under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .common import TOLERANCE, Stats, error_text, max_abs, max_abs_dict, round_robin, timed


@dataclass
class Row:
    """One tool's line in a workload table (JSON-serialisable through :meth:`as_dict`)."""

    label: str
    samples: list[float] = field(default_factory=list)
    max_abs: float | None = None
    compared_on: str = ""
    error: str | None = None
    note: str = ""
    cells: int | None = None
    timed_cells: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _check(label: str, fn: Callable[[], object], compare: Callable[[object], tuple[float, str]]) -> Row:
    row = Row(label)
    try:
        with torch.no_grad():
            row.max_abs, row.compared_on = compare(fn())
    except Exception as exc:  # a peer failing is a result, reported as such
        row.error = error_text(exc)
        return row
    if row.max_abs > TOLERANCE:
        row.note = f"results differ: max-abs {row.max_abs:.2e} > {TOLERANCE:g} ({row.compared_on})"
    return row


def _timed_table(cands: dict[str, Callable[[], object]], compare: Callable[[object], tuple[float, str]],
                 repeats: int, warmup: int, notes: dict[str, str]) -> list[dict]:
    rows = {k: _check(k, fn, compare) for k, fn in cands.items()}
    ok = {k: cands[k] for k, r in rows.items() if r.error is None}
    with torch.no_grad():
        stats = round_robin(ok, repeats, max(warmup - 1, 0))  # the check above was the first warm-up call
    for k, s in stats.items():
        rows[k].samples = s.samples
    for k, n in notes.items():
        if k in rows:
            rows[k].note = "; ".join(x for x in (rows[k].note, n) if x)
    return [r.as_dict() for r in rows.values()]


def forward(tools: dict, ids: torch.Tensor, mask: torch.Tensor, repeats: int, warmup: int) -> list[dict]:
    """Batch ``ids`` through every tool with no hooks; logits compared with HF's."""
    hf = tools["hf"]
    with torch.no_grad():
        ref = hf.forward(ids, mask)
    cands = {"HF (sdpa)": lambda: hf.forward(ids, mask),
             "HF (sdpa), use_cache=False": lambda: hf.forward(ids, mask, use_cache=False)}
    for key, label in (("fxlens", "fxlens `m(ids)`"), ("fxlens_compiled", "fxlens `m(ids)`, compiled"),
                       ("bridge", "TransformerBridge `bridge(ids)`"), ("nnsight", "nnsight `trace` + `.save()`")):
        cands[label] = _bind(tools, key, lambda t: t.forward(ids, mask))
    notes = {"TransformerBridge `bridge(ids)`": "the bridge forces eager attention",
             "fxlens `m(ids)`, compiled": "`torch.compile(dynamic=True)` of the captured graph"}
    return _timed_table(cands, lambda out: (max_abs(out, ref), "logits"), repeats, warmup, notes)


def cache(tools: dict, ids: torch.Tensor, mask: torch.Tensor, repeats: int, warmup: int) -> list[dict]:
    """Cache every residual + attention site (:data:`peers.common.CACHE_SITES`); compared with fxlens'."""
    hf = tools["hf"]
    with torch.no_grad():
        ref = dict(tools["fxlens"].cache(ids, mask))
    cands = {"HF (sdpa) plain forward (baseline, nothing cached)": lambda: hf.forward(ids, mask),
             "HF forward hooks (eager attention)": lambda: hf.cache(ids, mask)}
    for key, label in (("fxlens", "fxlens `run_with_cache`"), ("fxlens_compiled", "fxlens `run_with_cache`, compiled"),
                       ("bridge", "TransformerBridge `run_with_cache`"), ("nnsight", "nnsight `.save()` (eager)")):
        cands[label] = _bind(tools, key, lambda t: t.cache(ids, mask))

    def compare(out) -> tuple[float, str]:
        if isinstance(out, torch.Tensor):  # the baseline returns logits
            return 0.0, "(not compared)"
        worst, site = max_abs_dict(out, ref)
        peak = ref[site].abs().max().item()
        return worst, f"{site}, whose values reach {peak:.3g}: relative {worst / peak:.1e}"

    notes = {"HF forward hooks (eager attention)": "eager copy: sdpa returns no attention pattern",
             "nnsight `.save()` (eager)": "eager copy: sdpa returns no attention pattern"}
    return _timed_table(cands, compare, repeats, warmup, notes)


def _bind(tools: dict, key: str, call: Callable) -> Callable[[], object]:
    """``call(tools[key])``, or a function raising the tool's load error."""
    tool = tools.get(key)
    if isinstance(tool, BaseException) or tool is None:
        err = tool if tool is not None else RuntimeError(f"{key} was not loaded")

        def fail():
            raise err

        return fail
    return lambda: call(tool)


def patching(tools: dict, clean: torch.Tensor, corrupted: torch.Tensor, metric: Callable, repeats: int,
             loop_repeats: int, loop_cells: int | None) -> list[dict]:
    """``resid_pre`` x position patching of the IOI pair; every tool compared with fxlens' sweep.

    Loops are checked on three layers first, then timed on all cells (or on the first ``loop_cells``
    cells, in which case the row says so and the report extrapolates, labelled).
    """
    n_layers, n_pos = tools["fxlens"].model.cfg.n_layers, clean.shape[1]
    all_cells = [(layer, p) for layer in range(n_layers) for p in range(n_pos)]
    with torch.no_grad():
        fx_sweep = tools["fxlens"].patcher(clean, corrupted, metric)
        ref = fx_sweep()
        fx = Row("fxlens `get_act_patch_resid_pre` (default schedule, `logits_at=-1`)", max_abs=0.0,
                 compared_on="reference", cells=len(all_cells), timed_cells=len(all_cells))
        fx.samples = round_robin({"fx": fx_sweep}, repeats, 1)["fx"].samples
    rows = [fx.as_dict()]
    check_cells = [(layer, p) for layer in (0, n_layers // 2, n_layers - 1) for p in range(n_pos)]
    timed_cells = all_cells if loop_cells is None else all_cells[:loop_cells]
    loops = (("bridge", "TransformerLens `patching.get_act_patch_resid_pre` on the bridge", {}),
             ("nnsight", "nnsight loop (one `trace` per cell)", {}),
             ("nnsight", "nnsight, every cell an `invoke` of one `trace` (batched)", {"batched": True}),
             ("hf", "HF forward pre-hook loop (one forward per cell)", {}))
    for key, label, kw in loops:
        row = Row(label, cells=len(all_cells), timed_cells=len(timed_cells))
        tool = tools.get(key)
        try:
            if isinstance(tool, BaseException):
                raise tool
            with torch.no_grad():
                check = tool.patcher(clean, corrupted, metric, cells=check_cells, **kw)()
                sel = torch.tensor(check_cells).T
                row.max_abs, row.compared_on = max_abs(check[sel[0], sel[1]], ref[sel[0], sel[1]]), "3 layers"
                cells = None if loop_cells is None else timed_cells
                sweep = tool.patcher(clean, corrupted, metric, cells=cells, **kw)
                for _ in range(loop_repeats):
                    out: list[torch.Tensor] = []
                    row.samples.append(timed(lambda: out.append(sweep())))
                done = ~out[0].isnan()
                row.max_abs = max(row.max_abs, max_abs(out[0][done], ref[done]))
                row.compared_on = "all timed cells"
        except Exception as exc:
            row.error = error_text(exc)
        if row.max_abs is not None and row.max_abs > TOLERANCE:
            row.note = f"results differ: max-abs {row.max_abs:.2e} > {TOLERANCE:g}"
        rows.append(row.as_dict())
    return rows


__all__ = ["Row", "Stats", "forward", "cache", "patching"]
