"""``ActivationCache``: :class:`~fxlens.activations.Activations` with TransformerLens' analysis methods."""

from __future__ import annotations

import logging

import torch

from .activations import Activations
from .interventions import analysis as A
from .names import act_name

__all__ = ["ActivationCache", "act_name"]


class ActivationCache(Activations):
    """Cached activations of one forward, keyed by site name (TransformerLens' ``ActivationCache``).

    Index with a full name (``cache["blocks.3.hook_resid_pre"]``) or TL shorthand (``cache["resid_pre", 3]``,
    ``cache["resid_post", -1]``, ``cache["scale", 3, "ln1"]``, ``cache["k3"]``). The analysis methods
    (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``, ``logit_attrs``, ...) are the
    functions of :mod:`fxlens.interventions.analysis` with this cache and its model; they work on a
    cache whose batch dim was removed too.

    Args:
        cache_dict: site name -> tensor (kept, not copied: ``cache.cache_dict`` is it, as in TL).
        model: the model the activations come from (needed by the analysis methods).
        has_batch_dim: whether the tensors have a leading batch dim.
    """

    def _analysis(self):
        if self.model is None:
            raise ValueError("this cache has no model attached: make it with model.run_with_cache, or call the "
                             "fxlens.interventions.analysis functions with (cache, model)")
        return A

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.accumulated_resid` on this cache."""
        return self._analysis().accumulated_resid(self, self.model, layer, incl_mid, apply_ln, pos_slice, mlp_input,
                                                  return_labels)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """:func:`fxlens.interventions.analysis.logit_attrs` on this cache (scales the stack itself, as TL)."""
        return self._analysis().logit_attrs(self, self.model, residual_stack, tokens, incorrect_tokens, pos_slice,
                                            batch_slice, has_batch_dim)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """:func:`fxlens.interventions.analysis.decompose_resid` on this cache."""
        return self._analysis().decompose_resid(self, self.model, layer, mlp_input, mode, apply_ln, pos_slice,
                                                incl_embeds, return_labels)

    def compute_head_results(self) -> None:
        """Add ``blocks.L.attn.hook_result`` (``[batch, pos, n_heads, d_model]``) for every layer, in place (as TL)."""
        A = self._analysis()
        if all(A.has_head_results(self, self.model, L) for L in range(self._n_layers())):
            logging.warning("Tried to compute head results when they were already cached")
            return
        self.cache_dict.update(A.compute_head_results(self, self.model).cache_dict)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """:func:`fxlens.interventions.analysis.stack_head_results` on this cache."""
        return self._analysis().stack_head_results(self, self.model, layer, return_labels, incl_remainder,
                                                   pos_slice, apply_ln)

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None, project_output_onto=None):
        """:func:`fxlens.interventions.analysis.get_neuron_results` on this cache."""
        return self._analysis().get_neuron_results(self, self.model, layer, neuron_slice, pos_slice,
                                                   project_output_onto)

    def stack_neuron_results(self, layer: int | None = None, pos_slice=None, neuron_slice=None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto=None, mlp_input: bool = False):
        """:func:`fxlens.interventions.analysis.stack_neuron_results` on this cache."""
        return self._analysis().stack_neuron_results(self, self.model, layer, pos_slice, neuron_slice,
                                                     return_labels, incl_remainder, apply_ln, project_output_onto,
                                                     mlp_input)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """:func:`fxlens.interventions.analysis.apply_ln_to_stack` with this cache's norm scales."""
        return self._analysis().apply_ln_to_stack(self, self.model, residual_stack, layer, mlp_input, pos_slice,
                                                  batch_slice, has_batch_dim, recompute_ln)

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False, project_output_onto=None):
        """:func:`fxlens.interventions.analysis.get_full_resid_decomposition` on this cache."""
        return self._analysis().get_full_resid_decomposition(self, self.model, layer, mlp_input, expand_neurons,
                                                             apply_ln, pos_slice, return_labels, project_output_onto)
