"""A small vocabulary of interventions: zero, mean, resample, replace, add (steering).

Each patch is a keyword-only dataclass with one ``op(x, hook) -> values`` and an optional
region (``pos``, ``head``, ``neuron``) that limits where the values are written; outside the
region ``x`` is kept. Patches are hook functions (``fn(x, hook)``), so they work in
``run_with_hooks(fwd_hooks=[(name, ZeroPatch(head=3))])``, in ``with model.patch({...})`` and
inside patching sweeps (``patch_sweep(..., patch=MeanPatch(...))``).

Region dims come from the site's catalogue shape: ``pos`` is the ``pos``/``q_pos`` dim,
``head`` the ``n_heads``/``n_kv_heads`` dim, ``neuron`` the last dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..tracer.sites import site_dims

Index = int | slice | Sequence[int] | torch.Tensor | None


def region_mask(x: torch.Tensor, name: str, pos: Index = None, head: Index = None,
                neuron: Index = None, pos_offset: int = 0, generating: bool = False) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``x`` selecting the region; ``None`` means everywhere.

    ``pos`` are absolute positions. During generation (``generating``; with the KV cache a call holds
    positions ``pos_offset ..``) positions outside the current call select nothing; in a forward an
    out-of-range position raises.
    """
    if pos is None and head is None and neuron is None:
        return None
    dims = site_dims(name)
    want = {"pos": pos, "head": head, "neuron": neuron}
    axes = {"pos": next((i for i, d in enumerate(dims) if d in ("pos", "q_pos")), None),
            "head": next((i for i, d in enumerate(dims) if d in ("n_heads", "n_kv_heads")), None),
            "neuron": x.dim() - 1}
    mask = torch.ones((1,) * x.dim(), dtype=torch.bool, device=x.device)
    for key, sel in want.items():
        if sel is None:
            continue
        ax = axes[key]
        if ax is None:
            raise ValueError(f"{key}= needs a {key} dim; {name} has dims {dims}")
        if key == "pos" and generating:  # absolute positions; ones not in this call select nothing
            n = pos_offset + x.shape[ax]
            full = torch.zeros(n, dtype=torch.bool, device=x.device)
            if isinstance(sel, int):
                sel = [sel]
            if isinstance(sel, Sequence):
                sel = [p for p in sel if 0 <= p < n]
            full[sel] = True
            keep = full[pos_offset:]
        else:
            keep = torch.zeros(x.shape[ax], dtype=torch.bool, device=x.device)
            keep[sel if not isinstance(sel, Sequence) else list(sel)] = True
        mask = mask & keep.view([-1 if i == ax else 1 for i in range(x.dim())])
    return mask


@dataclass(kw_only=True, eq=False)
class Patch:
    """Base class: ``op`` gives the new values, the region says where they are written.

    Attributes:
        pos: positions to patch (``pos``/``q_pos`` dim); ``None`` = all.
        head: heads to patch (``n_heads``/``n_kv_heads`` dim); ``None`` = all.
        neuron: features of the last dim to patch (MLP neurons, residual directions); ``None`` = all.
    """

    pos: Index = None
    head: Index = None
    neuron: Index = None

    def op(self, x: torch.Tensor, hook) -> torch.Tensor:
        """New values for the whole tensor (the region picks from them)."""
        raise NotImplementedError(f"{type(self).__name__} must define op()")

    def __call__(self, x: torch.Tensor, hook) -> torch.Tensor:
        new = self.op(x, hook).to(dtype=x.dtype, device=x.device).expand_as(x)
        mask = region_mask(x, hook.name, self.pos, self.head, self.neuron, getattr(hook, "pos_offset", 0),
                           getattr(hook, "generating", False))
        return new.clone() if mask is None else torch.where(mask, new, x)


@dataclass(kw_only=True, eq=False)
class ZeroPatch(Patch):
    """Zero ablation."""

    def op(self, x, hook):
        return torch.zeros_like(x)


@dataclass(kw_only=True, eq=False)
class ReplacePatch(Patch):
    """Write ``value`` (broadcast to the site's shape), e.g. a cached clean activation."""

    value: torch.Tensor

    def op(self, x, hook):
        return self.value


@dataclass(kw_only=True, eq=False)
class AddPatch(Patch):
    """Steering: ``x + scale * vector`` (``vector`` broadcasts, e.g. ``[d_model]``)."""

    vector: torch.Tensor
    scale: float = 1.0

    def op(self, x, hook):
        return x + self.scale * self.vector.to(x.device, x.dtype)


@dataclass(kw_only=True, eq=False)
class MeanPatch(Patch):
    """Mean ablation: the batch mean of ``reference`` (the site's activations on a reference
    batch, ``[ref_batch, ...]``), or of the current batch when ``reference`` is ``None``."""

    reference: torch.Tensor | None = None

    def op(self, x, hook):
        ref = x if self.reference is None else self.reference
        return ref.mean(0, keepdim=True)


@dataclass(kw_only=True, eq=False)
class ResamplePatch(Patch):
    """Resample ablation: each row takes the activation of a random row of ``source``
    (``[n_source, ...]``, e.g. cached on other prompts); ``seed`` makes it repeatable."""

    source: torch.Tensor
    seed: int = 0

    def op(self, x, hook):
        g = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, self.source.shape[0], (x.shape[0],), generator=g)
        return self.source[rows.to(self.source.device)]


PatchSpec = Mapping[str, "Patch | Sequence[Patch]"]


def patch_context(model, patches: PatchSpec):
    """Apply ``{site: patch or [patches]}`` for the duration of the block; contexts nest.

    Names and patches are checked before anything is applied (``KeyError`` with the closest names).
    Like every hook context, the patches are seen by this thread / context only.
    """
    if not isinstance(patches, Mapping):
        raise TypeError(f"patch() takes a {{site name: Patch}} mapping, not {type(patches).__name__}")
    items = [(name, p) for name, ps in patches.items() for p in (ps if isinstance(ps, Sequence) else [ps])]
    for name, p in items:
        if not callable(p):
            raise TypeError(f"patch for {name} must be a Patch or fn(x, hook), not {type(p).__name__}")
    return model.hooks(fwd_hooks=items)
