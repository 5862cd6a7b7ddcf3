"""TransformerLens' ``hook_points`` for hand-written models: ``HookPoint`` modules under a ``HookedRootModule``.

A port of TL's toy example runs unchanged::

    class TwoLayerModel(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_in = HookPoint()
            ...
            super().setup()

``setup()`` names every :class:`HookPoint` module by its path and attaches it to the model's
:class:`~fxlens.hooks.HookStore`, so the hook API is the one traced models have
(:class:`~fxlens.hook_api.HookAPIMixin`): names checked before anything is registered, contexts
that remove exactly their own hooks, hooks of ``hooks()`` / ``run_with_hooks`` seen only by the
thread that added them, permanent hooks, backward hooks. ``isinstance(traced_model,
HookedRootModule)`` is true as well (every fxlens model is one, as in TL).
"""

from __future__ import annotations

import abc
import logging

import torch
from torch import nn

from .hook_api import HookAPIMixin, HookList, NameFilter
from .hooks import HookPoint, HookStore
from .model import HookedModel

__all__ = ["HookPoint", "HookedRootModule"]


class HookedRootModule(HookAPIMixin, nn.Module, metaclass=abc.ABCMeta):
    """An ``nn.Module`` whose :class:`HookPoint` submodules are hookable sites (TL's ``HookedRootModule``)."""

    def __init__(self, *args) -> None:
        super().__init__()
        self._hooks = HookStore()
        self.all_hook_names: list[str] = []
        self.hook_names: list[str] = []
        self.is_caching = False

    def setup(self) -> None:
        """Name the :class:`HookPoint` modules by path and attach them (call at the end of ``__init__``)."""
        self.all_hook_names = []
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.bind(name, self._hooks)
                self.all_hook_names.append(name)
        self.hook_names = list(self.all_hook_names)

    @property
    def mod_dict(self) -> dict[str, nn.Module]:
        """Every submodule by path (TL's ``mod_dict``)."""
        return dict(self.named_modules())

    def _unknown(self, name: str) -> KeyError:
        return KeyError(f"unknown hook point {name!r}; this model has {self.all_hook_names} "
                        "(did you call setup() at the end of __init__?)")

    def run_with_hooks(self, *model_args, fwd_hooks: HookList = (), bwd_hooks: HookList = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs):
        """Run the model with these hooks added for this call (TL's ``run_with_hooks``)."""
        if bwd_hooks and reset_hooks_end:
            logging.warning("backward hooks are removed at the end of run_with_hooks (reset_hooks_end=True): "
                            "they cannot run in a later backward pass")
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(self, names_filter: NameFilter = None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None):
        """``(cache, fwd_hooks, bwd_hooks)`` that store each selected site's value (and gradient)."""
        cache = {} if cache is None else cache
        names = self.resolve(names_filter)

        def store(key: str):
            def hook(x: torch.Tensor, hook: HookPoint) -> None:
                x = x.detach().to(device) if device is not None else x.detach()
                cache[key] = x[0] if remove_batch_dim else x
            return hook

        fwd = [(n, store(n)) for n in names]
        bwd = [(n, store(n + "_grad")) for n in names] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(self, *model_args, names_filter: NameFilter = None, device=None,
                       remove_batch_dim: bool = False, incl_bwd: bool = False, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        """``(output, {site: value})`` (TL's ``HookedRootModule.run_with_cache``); ``incl_bwd`` also
        runs ``output.backward()`` and stores ``site + "_grad"``."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim)
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        return out, cache


HookedRootModule.register(HookedModel)
