"""``ActivationCache``: a thin mapping from site names to tensors, with TL shorthand."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_SHORT = {
    "embed": "hook_embed", "pos_embed": "hook_pos_embed",
    "resid_pre": "blocks.{L}.hook_resid_pre", "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post", "attn_out": "blocks.{L}.hook_attn_out",
    "mlp_out": "blocks.{L}.hook_mlp_out", "mlp_in": "blocks.{L}.hook_mlp_in",
    "attn_in": "blocks.{L}.hook_attn_in", "q_input": "blocks.{L}.hook_q_input",
    "k_input": "blocks.{L}.hook_k_input", "v_input": "blocks.{L}.hook_v_input",
    "q": "blocks.{L}.attn.hook_q", "k": "blocks.{L}.attn.hook_k", "v": "blocks.{L}.attn.hook_v",
    "rot_q": "blocks.{L}.attn.hook_rot_q", "rot_k": "blocks.{L}.attn.hook_rot_k",
    "z": "blocks.{L}.attn.hook_z", "result": "blocks.{L}.attn.hook_result",
    "attn_scores": "blocks.{L}.attn.hook_attn_scores",
    "scores": "blocks.{L}.attn.hook_attn_scores", "pattern": "blocks.{L}.attn.hook_pattern",
    "pre": "blocks.{L}.mlp.hook_pre", "pre_linear": "blocks.{L}.mlp.hook_pre_linear",
    "post": "blocks.{L}.mlp.hook_post",
}


def act_name(name: str, layer: int | None = None, sub: str | None = None) -> str:
    """Full site name from TL shorthand: ``act_name("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``.

    ``sub`` selects a norm: ``act_name("scale", 2, "ln1")`` -> ``blocks.2.ln1.hook_scale``;
    ``act_name("normalized", None, "ln_final")`` -> ``ln_final.hook_normalized``.
    """
    if name in ("scale", "normalized"):
        if sub is None:
            raise KeyError(f"{name!r} needs a norm: sub='ln1', 'ln2' or 'ln_final'")
        return f"{sub}.hook_{name}" if layer is None else f"blocks.{layer}.{sub}.hook_{name}"
    if name not in _SHORT:
        if "." in name or name.startswith("hook_"):
            return name
        raise KeyError(f"unknown activation shorthand {name!r}; known: {sorted(_SHORT)}")
    full = _SHORT[name]
    if "{L}" in full:
        if layer is None:
            raise KeyError(f"{name!r} is per block: give a layer, e.g. cache[{name!r}, 0]")
        full = full.format(L=layer)
    return full


class ActivationCache(Mapping):
    """Cached activations of one forward, keyed by site name.

    Index with a full name (``cache["blocks.3.hook_resid_pre"]``) or TL shorthand
    (``cache["resid_pre", 3]``, ``cache["scale", 3, "ln1"]``). A cache made by ``run_with_cache``
    knows its model, so TransformerLens' analysis methods (``accumulated_resid``, ``decompose_resid``,
    ``stack_head_results``, ``logit_attrs``, ...) work on it; they call the functions of
    :mod:`fxlens.interventions.analysis`.
    """

    def __init__(self, data: dict[str, torch.Tensor], has_batch_dim: bool = True, model: Any = None):
        self._data = dict(data)
        self.has_batch_dim = has_batch_dim
        self.model = model

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            key = act_name(*key)
        elif key in _SHORT and "{L}" not in _SHORT[key]:
            key = _SHORT[key]
        if key not in self._data:
            close = difflib.get_close_matches(str(key), list(self._data), n=5, cutoff=0.5)
            raise KeyError(f"{key!r} is not in this cache; closest: {close}")
        return key

    def __getitem__(self, key) -> torch.Tensor:
        return self._data[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        try:
            self._key(key)
        except KeyError:
            return False
        return True

    def to(self, device: torch.device | str) -> ActivationCache:
        """A copy with every tensor moved to ``device``."""
        return ActivationCache({k: v.to(device) for k, v in self._data.items()}, self.has_batch_dim, self.model)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop the batch dimension (batch size must be 1)."""
        if not self.has_batch_dim:
            return self
        for k, v in self._data.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has shape {tuple(v.shape)}")
        return ActivationCache({k: v[0] for k, v in self._data.items()}, has_batch_dim=False, model=self.model)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites: {list(self._data)[:4]}{'...' if len(self) > 4 else ''})"

    # -- TransformerLens' analysis methods: the functions of fxlens.interventions.analysis ------------
    def _analysis(self):
        if self.model is None:
            raise ValueError("this cache has no model attached: make it with model.run_with_cache, or call the "
                             "fxlens.interventions.analysis functions with (cache, model)")
        if not self.has_batch_dim:
            raise ValueError("the analysis methods need the batch dim: run_with_cache without remove_batch_dim")
        from .interventions import analysis

        return analysis, self.model

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.accumulated_resid` on this cache."""
        A, m = self._analysis()
        return A.accumulated_resid(self, m, layer, incl_mid, apply_ln, pos_slice, return_labels)

    def decompose_resid(self, layer: int | None = None, mode: str = "all", incl_embeds: bool = True,
                        apply_ln: bool = False, pos_slice=None, return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.decompose_resid` on this cache."""
        A, m = self._analysis()
        return A.decompose_resid(self, m, layer, mode, incl_embeds, apply_ln, pos_slice, return_labels)

    def compute_head_results(self) -> None:
        """Add ``blocks.L.attn.hook_result`` (``[batch, pos, n_heads, d_model]``) for every layer, in place (as TL)."""
        A, m = self._analysis()
        self._data.update(A.compute_head_results(self, m)._data)

    def stack_head_results(self, layer: int | None = None, pos_slice=None, apply_ln: bool = False,
                           return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.stack_head_results` on this cache."""
        A, m = self._analysis()
        return A.stack_head_results(self, m, layer, pos_slice, apply_ln, return_labels)

    def stack_neuron_results(self, layer: int | None = None, pos_slice=None, apply_ln: bool = False,
                             return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.stack_neuron_results` on this cache."""
        A, m = self._analysis()
        return A.stack_neuron_results(self, m, layer, pos_slice, apply_ln, return_labels)

    def get_full_resid_decomposition(self, layer: int | None = None, expand_neurons: bool = True,
                                     apply_ln: bool = False, pos_slice=None, return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.get_full_resid_decomposition` on this cache."""
        A, m = self._analysis()
        return A.get_full_resid_decomposition(self, m, layer, expand_neurons, apply_ln, pos_slice, return_labels)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None) -> torch.Tensor:
        """:func:`fxlens.interventions.analysis.apply_ln_to_stack` with this cache's norm scales."""
        A, m = self._analysis()
        return A.apply_ln_to_stack(residual_stack, self, m, layer, pos_slice, mlp_input)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None) -> torch.Tensor:
        """:func:`fxlens.interventions.analysis.logit_attrs` with this cache's model."""
        A, m = self._analysis()
        return A.logit_attrs(m, residual_stack, tokens, incorrect_tokens)
