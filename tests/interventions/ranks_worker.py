"""One rank of ``test_ranks.py``: ``torchrun --standalone --nproc_per_node=2 -m tests.interventions.ranks_worker OUT``.

Each rank runs every sweep of :data:`CASES` split over the ranks (the process group is left to
fxlens to initialise from torchrun's variables) and in this process alone (``ranks=None``), then
the failure cases, and saves what it saw to ``OUT/rank{r}.pt``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from fxlens.interventions import patching as P
from fxlens.interventions.patches import ZeroPatch
from tests.conftest import tokens, traced


def setup():
    m = traced("llama")
    clean, corrupted = tokens(2, 6, seed=2), tokens(2, 6, seed=3)
    corrupted[:, :2] = clean[:, :2]  # a shared prefix: those cells are answered without compute
    _, cache = m.run_with_cache(clean)
    return m, corrupted, cache


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 7].mean()


def _with_hook(sweep: Callable, site: str = "blocks.0.hook_mlp_out") -> Callable:
    """``sweep`` with an active model-wide hook (each variant must run it as a per-cell loop would)."""
    def run(m, *args, **kw):
        m.add_hook(site, lambda x, hook: x * 0.5 + x.mean(0, keepdim=True))  # batch statistics too
        try:
            return sweep(m, *args, **kw)
        finally:
            m.reset_hooks()
    run.__wrapped__ = sweep
    return run


def _zero_resid_mid(m, corrupted, cache, metric, **kw):
    names = [f"blocks.{L}.hook_resid_mid" for L in range(m.cfg.n_layers)]
    return P.patch_sweep(m, corrupted, None, metric, names, patch=ZeroPatch(), **kw)


#: name -> (sweep, keywords); batch sizes give several chunks of unequal count per rank.
CASES: dict[str, tuple[Callable, dict]] = {
    "resid_pre_wavefront": (P.get_act_patch_resid_pre, dict(batch_size=6)),
    "resid_pre_loop": (P.get_act_patch_resid_pre, dict(schedule="loop")),
    "head_out_by_pos": (P.get_act_patch_attn_head_out_by_pos, dict(batch_size=10, logits_at=-1)),
    "head_out_all_pos_batched": (P.get_act_patch_attn_head_out_all_pos, dict(schedule="batched", batch_size=6)),
    "resid_post_hooked": (_with_hook(P.get_act_patch_resid_post), dict(batch_size=4)),
    "attn_out_hooked_batched": (_with_hook(P.get_act_patch_attn_out, "blocks.1.hook_resid_pre"),
                                dict(schedule="batched", batch_size=4)),
    "zero_resid_mid": (_zero_resid_mid, dict(batch_size=2)),
    "pattern_dest_src": (P.get_act_patch_attn_head_pattern_dest_src_pos, dict(batch_size=40)),
}


def _error(fn: Callable) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main(out: str) -> None:
    m, corrupted, cache = setup()
    lines = _Lines()
    log = logging.getLogger("fxlens.patching")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    seen: dict[str, object] = {"initialised_before": dist.is_available() and dist.is_initialized()}
    for name, (sweep, kw) in CASES.items():
        lines.lines.clear()
        seen[name] = sweep(m, corrupted, cache, metric, progress=False, **kw)
        seen[name + "/log"] = list(lines.lines)
        seen[name + "/alone"] = sweep(m, corrupted, cache, metric, progress=False, ranks=None, **kw)
    rank = dist.get_rank()
    seen["backend"], seen["rank"], seen["world"] = str(dist.get_backend()), rank, dist.get_world_size()

    calls = []

    def failing(logits):  # fails on rank 1's patched variants (its first call is the corrupted run's)
        calls.append(1)
        if rank == 1 and len(calls) > 1:
            raise ValueError("rank 1's metric fails")
        return metric(logits)

    other = tokens(2, 6, seed=4) if rank == 1 else corrupted
    seen["metric_fails"] = _error(lambda: P.get_act_patch_resid_pre(m, corrupted, cache, failing, batch_size=6,
                                                                    progress=False))
    seen["inputs_differ"] = _error(lambda: P.get_act_patch_resid_pre(m, other, cache, metric, progress=False))
    torch.save(seen, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
