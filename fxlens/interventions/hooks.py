"""TransformerLens-style hook points, run from inside the specialised graph.

The graph calls :func:`run_hook` at every hooked site. Which Python functions run is
looked up at call time from the active :class:`HookRegistry`, so the graph (compiled
or not) never has to be rebuilt when a function changes; only the *set* of hooked
sites selects the graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..tracer.sites import layer_of

HookFn = Callable[..., "torch.Tensor | None"]


class HookPoint:
    """What a hook function receives as ``hook``: the site's name and helpers."""

    def __init__(self, name: str):
        self.name = name
        self.ctx: dict = {}

    def layer(self) -> int:
        """Block index of this site; raises for sites outside blocks."""
        L = layer_of(self.name)
        if L is None:
            raise ValueError(f"{self.name} is not inside a block")
        return L

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


class HookRegistry:
    """Site name -> ordered hook functions, with persistent and temporary entries."""

    def __init__(self) -> None:
        self._fns: dict[str, list[tuple[HookFn, bool]]] = {}
        self.points: dict[str, HookPoint] = {}

    def add(self, name: str, fn: HookFn, *, temporary: bool) -> None:
        self.points.setdefault(name, HookPoint(name))
        self._fns.setdefault(name, []).append((fn, temporary))

    def remove_temporary(self) -> None:
        self._fns = {k: kept for k, v in self._fns.items() if (kept := [e for e in v if not e[1]])}

    def remove(self, name: str, fn: HookFn) -> None:
        """Remove one registration of ``fn`` at ``name`` (the last one added)."""
        entries = self._fns.get(name, [])
        for i in range(len(entries) - 1, -1, -1):
            if entries[i][0] is fn:
                del entries[i]
                break
        else:
            raise KeyError(f"{fn!r} is not registered at {name}")
        if not entries:
            del self._fns[name]

    def clear(self) -> None:
        self._fns.clear()

    def names(self) -> frozenset[str]:
        return frozenset(self._fns)

    def fns(self, name: str) -> list[HookFn]:
        return [fn for fn, _ in self._fns.get(name, [])]


_state = threading.local()


@contextmanager
def active(registry: HookRegistry) -> Iterator[None]:
    """Make ``registry`` the one :func:`run_hook` consults during a forward."""
    prev = getattr(_state, "registry", None)
    _state.registry = registry
    try:
        yield
    finally:
        _state.registry = prev


@torch.compiler.disable
def run_hook(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the active hooks of site ``name`` to ``x`` (called from graphs)."""
    registry: HookRegistry | None = getattr(_state, "registry", None)
    if registry is None:
        raise RuntimeError(f"site {name} was reached outside a fxlens forward call")
    point = registry.points[name]
    for fn in registry.fns(name):
        out = fn(x, hook=point)
        if out is None:
            continue
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"hook {getattr(fn, '__name__', fn)!r} on {name} returned {got}; expected a tensor of "
                f"shape {tuple(x.shape)} and dtype {x.dtype} (return None to leave the value unchanged)"
            )
        x = out.to(x.device)
    return x
