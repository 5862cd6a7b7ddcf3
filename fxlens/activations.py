"""``Activations``: site names to tensors with TransformerLens' shorthand indexing and slicing."""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .names import act_name
from .tracer.sites import site_dims
from .utils import as_slice


class Activations(Mapping):
    """Site name -> tensor of one forward, indexed by full name or TL shorthand; no model analyses.

    ``cache["blocks.3.hook_resid_pre"]``, ``cache["resid_pre", 3]``, ``cache["resid_post", -1]``,
    ``cache["scale", 3, "ln1"]``, ``cache["k3"]``. :class:`fxlens.ActivationCache` adds TransformerLens'
    analysis methods; the functions of :mod:`fxlens.interventions.analysis` take either.

    Args:
        cache_dict: site name -> tensor (kept, not copied: ``cache.cache_dict`` is it, as in TL).
        model: the model the activations come from (needed by the analyses and negative layers).
        has_batch_dim: whether the tensors have a leading batch dim.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model: Any = None, has_batch_dim: bool = True):
        if isinstance(model, bool):
            raise TypeError(f"{type(self).__name__}(cache_dict, model=None, has_batch_dim=True): the model comes "
                            "second, as in TransformerLens; pass has_batch_dim= by keyword")
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
        return f"{type(self).__name__} with keys {list(self.cache_dict)}"

    # -- moving, slicing --------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Activations:
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

    def remove_batch_dim(self, batch_size: int | None = None) -> Activations:
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

    def apply_slice_to_batch_dim(self, batch_slice) -> Activations:
        """A new cache with TL's ``Slice`` applied to the batch dim (an int removes the dim)."""
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
        return type(self)(out, self.model, has_batch_dim=self.has_batch_dim and s.mode != "int")

    def apply_slice_to_pos_dim(self, pos_slice) -> Activations:
        """A new cache with TL's ``Slice`` applied to each site's (query) position dim; sites without one
        are kept (an int removes the dim). Not in TransformerLens 4.3; ``run_with_cache(pos_slice=)`` does the same."""
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
        return type(self)(out, self.model, has_batch_dim=self.has_batch_dim)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
                         ) -> torch.Tensor:
        """``[layer, ...]``: ``activation_name`` of every block before ``layer`` (``-1`` / ``None``: all)."""
        n = self._n_layers()
        layer = n if layer is None or layer == -1 else layer
        return torch.stack([self[(activation_name, L, sublayer_type)] for L in range(layer)])
