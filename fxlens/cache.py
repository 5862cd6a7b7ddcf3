"""``ActivationCache``: site names to tensors, with TransformerLens' shorthand, slicing and analysis methods."""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
              "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post", "scores": "attn_scores"}
_ATTN = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "mid", "pre_linear"}


def act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """Full site name from TL shorthand (TransformerLens' ``get_act_name`` rules).

    ``act_name("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``; ``act_name("k6")`` -> ``blocks.6.attn.hook_k``;
    ``act_name("scale4ln1")`` / ``act_name("scale", 4, "ln1")`` -> ``blocks.4.ln1.hook_scale``;
    ``act_name("scale")`` -> ``ln_final.hook_scale``; a full name is returned as is. Aliases: ``attn``
    (pattern), ``attn_logits`` / ``scores`` (attn_scores), ``key`` / ``query`` / ``value``, ``mlp_pre`` /
    ``mlp_mid`` / ``mlp_post``; layer types ``a`` / ``attention`` (attn), ``m`` (mlp), ``b`` / ``block``.
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_ALIAS.get(name, name)
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    if name in ("scale", "normalized") and layer is None:
        return f"ln_final.hook_{name}"  # TL would give ln_final.ln_final.hook_... for layer_type="ln_final"
    full = f"blocks.{layer}." if layer is not None else ""
    full += f"{layer_type}." if layer_type else ""
    return full + f"hook_{name}"


class ActivationCache(Mapping):
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

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any = None, has_batch_dim: bool = True):
        if isinstance(model, bool):
            raise TypeError("ActivationCache(cache_dict, model=None, has_batch_dim=True): the model comes second, "
                            "as in TransformerLens; pass has_batch_dim= by keyword")
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self) -> bool:
        return "hook_pos_embed" in self.cache_dict

    def _n_layers(self) -> int:
        if self.model is None:
            raise KeyError("negative layer indices need the model's n_layers: this cache has no model attached")
        return self.model.cfg.n_layers

    def _key(self, key) -> str:
        if isinstance(key, str) and key in self.cache_dict:
            return key
        if isinstance(key, tuple):
            if len(key) > 1 and key[1] is not None and int(key[1]) < 0:
                key = (key[0], self._n_layers() + int(key[1]), *key[2:])
            full = act_name(*key)
        elif isinstance(key, str):
            full = act_name(key)
        else:
            raise KeyError(f"cache keys are site names or (name, layer[, layer_type]) tuples, not {key!r}")
        if full not in self.cache_dict:
            close = difflib.get_close_matches(full, list(self.cache_dict), n=5, cutoff=0.5)
            raise KeyError(f"{full!r} is not in this cache; closest: {close}")
        return full

    def __getitem__(self, key) -> torch.Tensor:
        return self.cache_dict[self._key(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __contains__(self, key) -> bool:
        try:
            self._key(key)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    # -- moving, slicing --------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> ActivationCache:
        """Move every tensor to ``device``, in place (as TL); returns the cache."""
        self.cache_dict = {k: v.to(device) for k, v in self.cache_dict.items()}
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """``torch.set_grad_enabled(mode)`` (global state, as TL)."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    def _batch_size(self) -> int:
        """The most common leading dim (broadcast entries, e.g. position embeddings, have 1)."""
        counts = Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        return counts.most_common(1)[0][0] if counts else 1

    def remove_batch_dim(self, batch_size: int | None = None) -> ActivationCache:
        """Drop the batch dim (batch size must be 1), in place (as TL); returns the cache."""
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        size = self._batch_size() if batch_size is None else batch_size
        if size != 1:
            raise ValueError(f"remove_batch_dim needs batch size 1; this cache has batch size {size} "
                             "(use apply_slice_to_batch_dim(i) to pick one row)")
        self.cache_dict = {k: v[0] if v.ndim > 0 and v.shape[0] == 1 else v for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> ActivationCache:
        """A new cache with TL's ``Slice`` applied to the batch dim (an int removes the dim)."""
        from .utils import as_slice

        s = as_slice(batch_slice)
        if not self.has_batch_dim and s.mode != "identity":
            raise ValueError("Cannot index into a cache without a batch dim")
        size = self._batch_size()
        out = {}
        for k, v in self.cache_dict.items():
            if v.ndim > 0 and v.shape[0] == size:
                out[k] = s.apply(v, 0)
            else:  # broadcast over the batch: keep, dropping its dim when the others lose theirs
                out[k] = v[0] if s.mode == "int" and v.ndim > 0 and v.shape[0] == 1 else v
        return ActivationCache(out, self.model, has_batch_dim=self.has_batch_dim and s.mode != "int")

    def apply_slice_to_pos_dim(self, pos_slice) -> ActivationCache:
        """A new cache with TL's ``Slice`` applied to each site's (query) position dim; sites without one
        are kept (an int removes the dim). Not in TransformerLens 4.3; ``run_with_cache(pos_slice=)`` does the same."""
        from .interventions.patches import site_dims
        from .utils import as_slice

        s = as_slice(pos_slice)
        out = {}
        for k, v in self.cache_dict.items():
            dims = site_dims(k[:-5] if k.endswith("_grad") else k)
            ax = next((i for i, d in enumerate(dims) if d in ("pos", "q_pos")), None)
            if ax is None:
                out[k] = v
                continue
            ax -= 0 if self.has_batch_dim else 1
            out[k] = s.apply(v, ax)
        return ActivationCache(out, self.model, has_batch_dim=self.has_batch_dim)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
                         ) -> torch.Tensor:
        """``[layer, ...]``: ``activation_name`` of every block before ``layer`` (``-1`` / ``None``: all)."""
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        return torch.stack([self[(activation_name, L, sublayer_type)] for L in range(layer)])

    # -- TransformerLens' analysis methods: the functions of fxlens.interventions.analysis --------------
    def _analysis(self):
        if self.model is None:
            raise ValueError("this cache has no model attached: make it with model.run_with_cache, or call the "
                             "fxlens.interventions.analysis functions with (cache, model)")
        from .interventions import analysis

        return analysis

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
