"""Hooks at ``blocks.L.attn.hook_result``: each head's output ``[batch, pos, n_heads, d_model]``.

The graph has no per-head output projection (HF runs one fused ``o_proj``), so a hook at
``hook_result`` runs through two graph sites: ``hook_z`` records the heads' outputs (after any
hooks there), and ``hook_attn_out`` computes ``r = einsum(z, W_O)``, runs the hooks on it and
adds what they changed, ``attn_out + sum_h (r' - r)_h``. An identity hook leaves the output
bit-exact; ablating a head removes exactly its term. Used only where the heads' results sum to
``hook_attn_out`` (checked once per model; models that norm the attention output, Gemma 2/3,
are refused).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch

from .hooks import Hook, HookPoint, check_result
from .tracer.sites import layer_of

SUFFIX = ".attn.hook_result"
_LAST = sys.maxsize  # the recorder runs after every other hook at hook_z


def is_result(site: str) -> bool:
    return site.endswith(SUFFIX)


def graph_sites(site: str) -> tuple[str, ...]:
    """The graph sites a hook at ``site`` needs."""
    if not is_result(site):
        return (site,)
    L = layer_of(site)
    return f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_attn_out"


def head_results(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """``[.., n_heads, d_head] x [n_heads, d_head, d_model] -> [.., n_heads, d_model]``."""
    dtype = torch.promote_types(z.dtype, W_O.dtype)
    return torch.einsum("...hd,hdm->...hm", z.to(dtype), W_O.to(dtype))


def expand(entries: Sequence[Hook], W_O: Callable[[int], torch.Tensor],
           point: Callable[[str], HookPoint]) -> list[Hook]:
    """``entries`` with the ``hook_result`` ones replaced by a recorder at ``hook_z`` and an
    applier at ``hook_attn_out`` per layer (see the module docstring)."""
    out = [h for h in entries if not is_result(h.site)]
    by_site: dict[str, list[Hook]] = {}
    for h in entries:
        if is_result(h.site):
            if h.dir != "fwd":
                raise ValueError(f"backward hooks at {h.site} are not supported: hook attn.hook_z's gradient "
                                 "(per head) instead")
            by_site.setdefault(h.site, []).append(h)
    for site, hooks in by_site.items():
        out += _pair(site, hooks, W_O(layer_of(site)), point(site))
    return sorted(out, key=lambda h: h.seq)


def _pair(site: str, hooks: list[Hook], W_O: torch.Tensor, hp: HookPoint) -> list[Hook]:
    z_site, out_site = graph_sites(site)
    seen: list[torch.Tensor] = []

    def record(z: torch.Tensor, hook) -> None:
        seen.append(z)

    def apply(attn_out: torch.Tensor, hook) -> torch.Tensor:
        if not seen:
            raise RuntimeError(f"{site}: {z_site} did not run before {out_site} in this forward")
        z = seen.pop()
        r = head_results(z, W_O)
        new = r
        for h in hooks:
            new = check_result(h.fn, site, new, h.fn(new, hook=hp))
        return attn_out + (new - head_results(z, W_O)).sum(-2).to(attn_out.dtype)

    return [Hook(z_site, record, seq=_LAST), Hook(out_site, apply, seq=hooks[0].seq)]


def result_names(model, listed: bool = False) -> list[str]:
    """``attn.hook_result`` names this model can hook (``listed``: those ``names_filter`` predicates and
    ``names_filter=None`` include, only with ``cfg.use_attn_result`` as in TransformerLens)."""
    if (listed and not model.cfg.use_attn_result) or model.family.attn_post_norm is not None:
        return []
    sites = model.all_hook_names_set
    return [f"blocks.{L}{SUFFIX}" for L in range(model.cfg.n_layers)
            if all(s in sites for s in graph_sites(f"blocks.{L}{SUFFIX}"))]


def check_exact(model) -> None:
    """Raise unless ``sum_h head_results + b_O == hook_attn_out`` in every layer (probed once per model)."""
    def probe() -> float:
        ids = torch.arange(3, 9, device=model.device)[None] % model.cfg.d_vocab
        names = [s for L in range(model.cfg.n_layers) for s in graph_sites(f"blocks.{L}{SUFFIX}")]
        worst = 0.0
        with torch.no_grad():
            cache = model.run(ids, names=names, use_model_hooks=False).cache
            for L in range(model.cfg.n_layers):
                z, out = cache[names[2 * L]], cache[names[2 * L + 1]].double()
                total = head_results(z, model.W_O[L]).sum(-2).double() + model.b_O[L].double()
                worst = max(worst, float((total - out).abs().max() / (1 + out.abs().max())))
        return worst

    err = model.memo("head_results_exact", probe)
    if err > 1e-5:
        raise ValueError(f"attn.hook_result cannot be hooked in this {model.cfg.family} model: the heads' results "
                         f"(hook_z @ W_O) plus b_O differ from hook_attn_out (relative max-abs {err:.3g}; the model "
                         "scales the attention output after the projection). Hook attn.hook_z per head instead.")
