"""TransformerLens' ``patching`` module, on fxlens' batched schedules.

Every function of ``transformer_lens.patching`` is here with its signature and result shape:
``generic_activation_patch`` with TL's patch setters, and the ``get_act_patch_*`` helpers
(residual stream, attention / MLP outputs, each head's output, queries, keys, values and pattern,
by position or across positions, and the ``*_every`` stacks). They run on the wavefront / batched
schedules of :mod:`fxlens.interventions.sweep` (``schedule=`` etc. pass through as keywords) instead
of one forward per cell, with the same numbers; cells where clean and corrupted activations are equal
are answered exactly without compute. Under ``torchrun`` they split their cells over the ranks
(``ranks=``, :mod:`fxlens.interventions.ranks`). GQA: key/value variants have ``n_key_value_heads`` heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

from ..names import act_name
from .attribution import GRIDS as ATTRIBUTION_GRIDS
from .attribution import attribution_patch
from .patches import ReplacePatch
from .sweep import (
    Cell,
    _check_compile,
    _logit_positions,
    corrupted_run,
    parse_bytes,
    patch_sweep,
    rows_for_memory,
    run_cells,
)

__all__ = ["ATTRIBUTION_GRIDS", "attribution_patch", "generic_activation_patch", "patch_sweep", "parse_bytes",
           "rows_for_memory"]


# -- TransformerLens' patch setters -------------------------------------------------------------
def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos]; activations ``[batch, pos, ...]``."""
    _, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, pos, head_index]; activations ``[batch, pos, head_index, ...]``."""
    _, pos, head = index
    corrupted_activation[:, pos, head] = clean_activation[:, pos, head]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; activations ``[batch, pos, head_index, ...]``."""
    _, head = index
    corrupted_activation[:, :, head] = clean_activation[:, :, head]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index]; patterns ``[batch, head_index, dest_pos, src_pos]``."""
    _, head = index
    corrupted_activation[:, head, :, :] = clean_activation[:, head, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos]; patterns ``[batch, head_index, dest_pos, src_pos]``."""
    _, head, dest = index
    corrupted_activation[:, head, dest, :] = clean_activation[:, head, dest, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """index = [layer, head_index, dest_pos, src_pos]; patterns ``[batch, head_index, dest_pos, src_pos]``."""
    _, head, dest, src = index
    corrupted_activation[:, head, dest, src] = clean_activation[:, head, dest, src]
    return corrupted_activation


_REGION_SETTERS = {layer_pos_patch_setter, layer_pos_head_vector_patch_setter, layer_head_vector_patch_setter,
                   layer_head_pattern_patch_setter, layer_head_pos_pattern_patch_setter,
                   layer_head_dest_src_pos_pattern_patch_setter}


def _setter_op(setter: Callable, index: list[int], clean: torch.Tensor) -> Callable:
    return lambda x, hook: setter(x.clone(), index, clean)


def generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, patch_setter: Callable,
                             activation_name: str, index_axis_names: Sequence[str] | None = None, index_df=None,
                             return_index_df: bool = False, **kw):
    """TransformerLens' ``generic_activation_patch``: one cell per row of indices (``layer`` first).

    TL's own setters become region masks (batched, equal cells skipped); any other ``patch_setter``
    runs as given on each variant's rows. ``index_df`` (a pandas DataFrame) gives a flat result.
    ``kw``: ``schedule``, ``batch_size``, ``logits_at``, ``attention_mask``, ``progress``, ``compile``, ``ranks``.
    """
    ids = torch.as_tensor(corrupted_tokens, device=model.device)
    ids = ids[None] if ids.dim() == 1 else ids
    heads = model.cfg.n_kv_heads if activation_name in ("k", "v") else model.cfg.n_heads
    ranges = {"layer": model.cfg.n_layers, "pos": ids.shape[-1], "src_pos": ids.shape[-1],
              "dest_pos": ids.shape[-1], "head_index": heads, "head": heads}
    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names (e.g. ('layer', 'pos')) or index_df")
        unknown = [a for a in index_axis_names if a not in ranges]
        if unknown:
            raise ValueError(f"unknown index axis names {unknown}; known: {sorted(ranges)}")
        shape = [ranges[a] for a in index_axis_names]
        rows = [list(r) for r in itertools.product(*(range(n) for n in shape))]
    else:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        rows, shape = [[int(v) for v in r] for r in index_df.itertuples(index=False)], [len(index_df)]
    mask = torch.ones_like(ids) if kw.get("attention_mask") is None else torch.as_tensor(kw["attention_mask"])
    mask = mask.to(ids.device)
    sites = sorted({act_name(activation_name, r[0]) for r in rows}, key=model.all_hook_names.index)
    corrupt_logits, corrupt = corrupted_run(model, ids, mask, sites, clean_cache)
    cells = []
    for r in rows:
        site = act_name(activation_name, r[0])
        clean = clean_cache[site]
        if patch_setter in _REGION_SETTERS:
            region = patch_setter(torch.zeros((1, *clean.shape[1:]), dtype=torch.bool, device=clean.device), r,
                                  torch.ones((1, *clean.shape[1:]), dtype=torch.bool, device=clean.device))
            cells.append(Cell(site, region, ReplacePatch(value=clean).op))
        else:
            cells.append(Cell(site, None, _setter_op(patch_setter, r, clean)))
    schedule = kw.get("schedule", "auto")
    out = run_cells(model, ids, mask, cells, patching_metric, corrupt_logits, corrupt,
                    clean_cache if patch_setter in _REGION_SETTERS else None, schedule=schedule,
                    batch_size=kw.get("batch_size", 512), keep=_logit_positions(ids.shape[1], kw.get("logits_at"))
                    .to(ids.device), progress=kw.get("progress", True),
                    compile=_check_compile(model, kw.get("compile"), schedule),
                    ranks=kw.get("ranks", "auto")).reshape(shape)
    if return_index_df:
        import pandas as pd

        return out, (index_df if index_df is not None else pd.DataFrame(rows, columns=list(index_axis_names)))
    return out


def _layers(model, template: str) -> list[str]:
    return [template.format(L=L) for L in range(model.cfg.n_layers)]


def get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Residual stream entering each block, by position: ``[n_layers, pos]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.hook_resid_pre"), **kw)


def get_act_patch_resid_mid(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Residual stream between attention and MLP, by position: ``[n_layers, pos]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.hook_resid_mid"), **kw)


def get_act_patch_resid_post(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Residual stream leaving each block, by position: ``[n_layers, pos]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.hook_resid_post"), **kw)


def get_act_patch_attn_out(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Attention output, by position: ``[n_layers, pos]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.hook_attn_out"), **kw)


def get_act_patch_mlp_out(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """MLP output, by position: ``[n_layers, pos]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.hook_mlp_out"), **kw)


def get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, patching_metric,
                                        **kw) -> torch.Tensor:
    """Each head's output (``hook_z``) at every position at once: ``[n_layers, n_heads]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.attn.hook_z"), by_pos=False, by_head=True, **kw)


def get_act_patch_attn_head_out_by_pos(model, corrupted_tokens, clean_cache, patching_metric,
                                       **kw) -> torch.Tensor:
    """Each head's output (``hook_z``) by position: ``[n_layers, pos, n_heads]``."""
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       _layers(model, "blocks.{L}.attn.hook_z"), by_pos=True, by_head=True, **kw)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """``resid_pre``, ``attn_out`` and ``mlp_out`` by layer and position: ``[3, n_layers, pos]``."""
    names = [*_layers(model, "blocks.{L}.hook_resid_pre"), *_layers(model, "blocks.{L}.hook_attn_out"),
             *_layers(model, "blocks.{L}.hook_mlp_out")]
    out = patch_sweep(model, corrupted_tokens, clean_cache, patching_metric, names, **kw)
    return out.unflatten(0, (3, model.cfg.n_layers))


def _heads(model, act: str, corrupted_tokens, clean_cache, patching_metric, by_pos: bool, **kw) -> torch.Tensor:
    return patch_sweep(model, corrupted_tokens, clean_cache, patching_metric,
                       [act_name(act, L) for L in range(model.cfg.n_layers)], by_pos=by_pos, by_head=True, **kw)


def get_act_patch_attn_head_q_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each head's queries by position: ``[n_layers, pos, n_heads]``."""
    return _heads(model, "q", corrupted_tokens, clean_cache, patching_metric, True, **kw)


def get_act_patch_attn_head_k_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each KV head's keys by position: ``[n_layers, pos, n_key_value_heads]``."""
    return _heads(model, "k", corrupted_tokens, clean_cache, patching_metric, True, **kw)


def get_act_patch_attn_head_v_by_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each KV head's values by position: ``[n_layers, pos, n_key_value_heads]``."""
    return _heads(model, "v", corrupted_tokens, clean_cache, patching_metric, True, **kw)


def get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, patching_metric,
                                           **kw) -> torch.Tensor:
    """Each head's pattern by destination position: ``[n_layers, n_heads, dest_pos]``."""
    return _heads(model, "pattern", corrupted_tokens, clean_cache, patching_metric, True, **kw).transpose(1, 2)


def get_act_patch_attn_head_q_all_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each head's queries at every position at once: ``[n_layers, n_heads]``."""
    return _heads(model, "q", corrupted_tokens, clean_cache, patching_metric, False, **kw)


def get_act_patch_attn_head_k_all_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each KV head's keys at every position at once: ``[n_layers, n_key_value_heads]``."""
    return _heads(model, "k", corrupted_tokens, clean_cache, patching_metric, False, **kw)


def get_act_patch_attn_head_v_all_pos(model, corrupted_tokens, clean_cache, patching_metric, **kw) -> torch.Tensor:
    """Each KV head's values at every position at once: ``[n_layers, n_key_value_heads]``."""
    return _heads(model, "v", corrupted_tokens, clean_cache, patching_metric, False, **kw)


def get_act_patch_attn_head_pattern_all_pos(model, corrupted_tokens, clean_cache, patching_metric,
                                            **kw) -> torch.Tensor:
    """Each head's whole pattern: ``[n_layers, n_heads]``."""
    return _heads(model, "pattern", corrupted_tokens, clean_cache, patching_metric, False, **kw)


def get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted_tokens, clean_cache, patching_metric,
                                                 **kw) -> torch.Tensor:
    """Each (destination, source) entry of each head's pattern: ``[n_layers, n_heads, dest_pos, src_pos]``."""
    return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric,
                                    layer_head_dest_src_pos_pattern_patch_setter, "pattern",
                                    ("layer", "head_index", "dest_pos", "src_pos"), **kw)


def _pad_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> torch.Tensor:
    """Output, query, key, value and pattern of every head across positions: ``[5, n_layers, n_heads]``
    (key/value rows zero-padded to ``n_heads`` under GQA, as TransformerLens does)."""
    args, n = (model, corrupted_tokens, clean_cache, metric), model.cfg.n_heads
    return torch.stack([get_act_patch_attn_head_out_all_pos(*args, **kw),
                        get_act_patch_attn_head_q_all_pos(*args, **kw),
                        _pad_heads(get_act_patch_attn_head_k_all_pos(*args, **kw), n),
                        _pad_heads(get_act_patch_attn_head_v_all_pos(*args, **kw), n),
                        get_act_patch_attn_head_pattern_all_pos(*args, **kw)])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric, **kw) -> torch.Tensor:
    """The same by position: ``[5, n_layers, pos, n_heads]``."""
    args, n = (model, corrupted_tokens, clean_cache, metric), model.cfg.n_heads
    return torch.stack([get_act_patch_attn_head_out_by_pos(*args, **kw),
                        get_act_patch_attn_head_q_by_pos(*args, **kw),
                        _pad_heads(get_act_patch_attn_head_k_by_pos(*args, **kw), n),
                        _pad_heads(get_act_patch_attn_head_v_by_pos(*args, **kw), n),
                        get_act_patch_attn_head_pattern_by_pos(*args, **kw).transpose(1, 2)])
