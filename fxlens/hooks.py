"""Hook state: which Python functions run at which sites, owned by the call, not the model.

A model's :class:`HookStore` holds two kinds of entries:

* **model-wide** ones, added by ``add_hook`` / ``add_perma_hook`` (and by contexts entered with
  ``reset_hooks_end=False``): they stay until ``reset_hooks`` and every thread sees them, as in
  TransformerLens;
* **context** ones, added by ``hooks()``, ``run_with_hooks`` and ``patch()``: they live in a
  :class:`contextvars.ContextVar`, so they are seen only by the thread (or asyncio task) that
  entered the context, and leaving a context removes exactly the entries it added.

The graph calls :func:`run_hook` at every hooked site; it looks the functions up in the
*running call* (a :class:`HookCall` set for the duration of one forward), so a hook added
during a forward to a later site runs in that same forward, as in TransformerLens.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from .tracer.sites import layer_of

HookFn = Callable[..., "torch.Tensor | None"]
_SEQ = itertools.count()


class HookPoint(nn.Module):
    """A site: what a hook function receives as ``hook``, and TransformerLens' identity module.

    In a traced model it names a graph site (``name``, ``ctx``, ``layer()``, ``add_hook``); in a
    hand-written :class:`~fxlens.hook_points.HookedRootModule` it is also the identity module the
    model calls (``self.hook_square(x * x)``), running the hooks registered for it.

    ``ctx`` is a dict that persists across calls (TransformerLens' ``hook.ctx``) until
    ``reset_hooks(clear_contexts=True)``. ``pos_offset`` is how many positions came before the
    current call (non-zero only during cached generation, where ``generating`` is True).
    """

    def __init__(self, name: str | None = None, store: HookStore | None = None):
        super().__init__()
        self.name = name
        self.ctx: dict = {}
        self.pos_offset = 0
        self.generating = False
        self._store = store

    def bind(self, name: str, store: HookStore) -> None:
        """Attach this module to ``store`` under ``name`` (done by ``HookedRootModule.setup``)."""
        self.name, self._store = name, store
        store.adopt(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._store is None else self._store.run(self.name, x)

    def layer(self) -> int:
        """Block index of this site; raises for sites outside blocks."""
        L = layer_of(self.name)
        if L is None:
            raise ValueError(f"{self.name} is not inside a block")
        return L

    def add_hook(self, hook: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None,
                 prepend: bool = False) -> None:
        """Add a model-wide hook at this site (as ``model.add_hook(self.name, ...)``)."""
        if self._store is None:
            raise ValueError(f"{self!r} belongs to no model (call setup() on the root module first)")
        self._store.add_shared([Hook(self.name, hook, dir, is_permanent)], prepend=prepend)

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        """Remove this site's model-wide and context hooks (permanent ones only if asked)."""
        if self._store is not None:
            self._store.reset(dir=dir, including_permanent=including_permanent, site=self.name)

    def clear_context(self) -> None:
        self.ctx.clear()

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


@dataclass(frozen=True, eq=False)
class Hook:
    """One registration: ``fn`` at ``site``, forward (``"fwd"``) or backward (``"bwd"``)."""

    site: str
    fn: HookFn
    dir: str = "fwd"
    permanent: bool = False
    seq: int = field(default_factory=lambda: next(_SEQ))

    def __post_init__(self) -> None:
        if self.dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', not {self.dir!r}")
        if not callable(self.fn):
            raise TypeError(f"the hook for {self.site} must be callable fn(tensor, hook), "
                            f"not {type(self.fn).__name__}")


class HookCall:
    """The hooks of one running forward: ``fns(site, dir)`` is consulted by :func:`run_hook`."""

    hooked: frozenset[str] = frozenset()

    def fns(self, site: str, dir: str) -> list[HookFn]:
        raise NotImplementedError

    def point(self, site: str) -> HookPoint:
        raise NotImplementedError


class FixedHooks(HookCall):
    """A call with a fixed ``{site: [fn]}`` table (sweeps build their own)."""

    def __init__(self, fwd: dict[str, list[HookFn]], points: dict[str, HookPoint] | None = None):
        self._fwd, self.hooked = fwd, frozenset(fwd)
        self._points = points if points is not None else {}

    def fns(self, site: str, dir: str) -> list[HookFn]:
        return list(self._fwd.get(site, ())) if dir == "fwd" else []

    def point(self, site: str) -> HookPoint:
        return self._points.setdefault(site, HookPoint(site))


_CURRENT: ContextVar[HookCall | None] = ContextVar("fxlens_hook_call", default=None)


class HookStore:
    """The hooks of one model: model-wide entries (shared, locked) and per-context entries."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._shared: tuple[Hook, ...] = ()
        self._context: ContextVar[tuple[Hook, ...]] = ContextVar(f"fxlens_hooks_{id(self)}", default=())
        self._points: dict[str, HookPoint] = {}

    def point(self, site: str) -> HookPoint:
        with self._lock:
            p = self._points.get(site)
            if p is None:
                p = self._points[site] = HookPoint(site, self)
            return p

    def adopt(self, point: HookPoint) -> None:
        """Use ``point`` (a module of a hand-written root module) as the hook point of its site."""
        with self._lock:
            self._points[point.name] = point

    def run(self, site: str, x: torch.Tensor) -> torch.Tensor:
        """Apply the hooks visible now at ``site`` to ``x``, outside any graph (module hook points)."""
        with calling(StoreCall(self, frozenset(self._points))):
            return run_hook(site, x)

    def state(self) -> tuple[tuple[Hook, ...], tuple[Hook, ...]]:
        """``(model-wide, this context's)`` entries; each tuple is replaced, never mutated, on a change."""
        return self._shared, self._context.get()

    def entries(self) -> tuple[Hook, ...]:
        """Every hook visible to the current thread/context, in registration order."""
        return tuple(sorted((*self._shared, *self._context.get()), key=lambda h: h.seq))

    def sites(self) -> frozenset[str]:
        return frozenset(h.site for h in self.entries())

    def _check_running(self, hooks: list[Hook]) -> None:
        call = _CURRENT.get()
        if not isinstance(call, StoreCall) or call.store is not self:
            return
        late = sorted({h.site for h in hooks if h.site not in call.hooked})
        if late:
            raise RuntimeError(
                f"a hook was added at {late} during a forward whose graph does not hook "
                f"{'that site' if len(late) == 1 else 'those sites'}, so it could not run in this forward. "
                "Register it before the call (e.g. a no-op hook at that site in the same run_with_hooks).")

    def add_shared(self, hooks: list[Hook], prepend: bool = False) -> None:
        self._check_running(hooks)
        if prepend:
            hooks = [Hook(h.site, h.fn, h.dir, h.permanent, seq=-next(_SEQ)) for h in hooks]
        with self._lock:
            self._shared = (*self._shared, *hooks)

    @contextmanager
    def context(self, hooks: list[Hook]) -> Iterator[None]:
        """Add ``hooks`` for the current thread/context; on exit remove exactly those."""
        self._check_running(hooks)
        self._context.set((*self._context.get(), *hooks))
        try:
            yield
        finally:
            mine = set(map(id, hooks))
            self._context.set(tuple(h for h in self._context.get() if id(h) not in mine))

    def remove(self, hooks: list[Hook]) -> None:
        """Remove these registrations wherever they are (already removed ones are ignored)."""
        mine = set(map(id, hooks))
        with self._lock:
            self._shared = tuple(h for h in self._shared if id(h) not in mine)
        self._context.set(tuple(h for h in self._context.get() if id(h) not in mine))

    def reset(self, *, dir: str = "both", including_permanent: bool = False, clear_contexts: bool = False,
              site: str | None = None) -> None:
        """Remove hooks (TransformerLens' ``reset_hooks``): non-permanent ones unless asked."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction must be 'fwd', 'bwd' or 'both', not {dir!r}")

        def keep(h: Hook) -> bool:
            hit = (dir in ("both", h.dir)) and (including_permanent or not h.permanent)
            return not hit or (site is not None and h.site != site)

        with self._lock:
            self._shared = tuple(filter(keep, self._shared))
            if clear_contexts:
                for name, p in self._points.items():
                    if site is None or name == site:
                        p.ctx.clear()
        self._context.set(tuple(filter(keep, self._context.get())))


class StoreCall(HookCall):
    """A forward of a model: hooks are looked up live in its store (the caller's context)."""

    def __init__(self, store: HookStore, hooked: frozenset[str], extra: tuple[Hook, ...] = (),
                 use_store: bool = True, expand: Callable[[list[Hook]], list[Hook]] | None = None):
        self.store, self.hooked, self.extra, self.use_store = store, hooked, extra, use_store
        self.expand = expand  # rewrites entries at non-graph sites (attn.hook_result) into graph ones
        self._seen: tuple | None = None
        self._index: dict[tuple[str, str], list[HookFn]] = {}

    def fns(self, site: str, dir: str) -> list[HookFn]:
        state = self.store.state() if self.use_store else ((), ())
        if self._seen is None or any(a is not b for a, b in zip(state, self._seen)):
            # first call, or hooks were added/removed since: index once, not once per site
            self._seen, self._index = state, {}
            entries = sorted((*state[0], *state[1], *self.extra), key=lambda h: h.seq)
            for h in self.expand(entries) if self.expand else entries:
                self._index.setdefault((h.site, h.dir), []).append(h.fn)
        return list(self._index.get((site, dir), ()))

    def point(self, site: str) -> HookPoint:
        return self.store.point(site)


@contextmanager
def calling(call: HookCall) -> Iterator[None]:
    """Make ``call`` the one :func:`run_hook` consults (nests: a hook may run another model)."""
    token = _CURRENT.set(call)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def check_result(fn: HookFn, name: str, x: torch.Tensor, out: object) -> torch.Tensor:
    """A hook's return value, checked: same shape, dtype and device as ``x`` (``None``: unchanged)."""
    if out is None:
        return x
    if (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
            or out.device != x.device):
        got = ((tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(
            f"hook {getattr(fn, '__name__', fn)!r} on {name} returned {got}; expected a tensor of shape "
            f"{tuple(x.shape)}, dtype {x.dtype} on {x.device} (return None to leave the value unchanged)")
    return out


def _backward(name: str, fns: list[HookFn], point: HookPoint) -> Callable:
    def on_grad(grad: torch.Tensor) -> torch.Tensor:
        for fn in fns:
            grad = check_result(fn, f"{name} (backward)", grad, fn(grad, hook=point))
        return grad
    return on_grad


@torch.compiler.disable
def run_hook(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply the running call's hooks of site ``name`` to ``x`` (called from graphs)."""
    call = _CURRENT.get()
    if call is None:
        raise RuntimeError(f"site {name} was reached outside a fxlens forward call")
    point = call.point(name)
    for fn in call.fns(name, "fwd"):
        x = check_result(fn, name, x, fn(x, hook=point))
    bwd = call.fns(name, "bwd")
    if bwd and x.requires_grad:
        x = x.view_as(x)  # a node of its own: the hook sees the gradient of this site only
        x.register_hook(_backward(name, bwd, point))
    return x
