"""TransformerLens' hook API (``hooks``, ``add_hook``, ``reset_hooks``, ...), mixed into ``HookedModel``.

Every name is checked before anything is registered, so a typo in the second hook of a list
leaves no first hook behind. See :mod:`fxlens.hooks` for who sees which hook.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from .hooks import Hook, HookFn, HookPoint, HookStore

NameFilter = str | Iterable[str] | Callable[[str], bool] | None
HookList = Iterable[tuple[str | Callable[[str], bool], HookFn]]


class HookAPIMixin:
    """Name resolution and hook registration for :class:`~fxlens.HookedModel`."""

    _hooks: HookStore
    all_hook_names: list[str]
    hook_names: list[str]

    # -- names --------------------------------------------------------------------------
    def _unknown(self, name: str) -> KeyError:
        if name in self.extra_hook_names():
            return KeyError(f"{name} is computed from hook_z, not a graph site: hook it by name, or cache it with "
                            "run_with_cache after model.set_use_attn_result(True)")
        if name.endswith("attn.hook_result"):
            return KeyError(f"{name} is not available in this {self.cfg.family} model: its heads' results do not "
                            "sum to hook_attn_out (the attention output is normed or scaled after the projection); "
                            "hook attn.hook_z per head instead")
        close = difflib.get_close_matches(name, self.all_hook_names, n=5, cutoff=0.5)
        return KeyError(f"unknown site {name!r} for this {self.cfg.family} model; closest: {close}")

    def resolve(self, names: NameFilter) -> list[str]:
        """Site names selected by a name, a list of names or a predicate (``None``: all)."""
        if names is None:
            return list(self.hook_names)
        if callable(names):
            return [n for n in self.hook_names if names(n)]
        if isinstance(names, str):
            names = [names]
        elif isinstance(names, (bytes, bytearray)) or not isinstance(names, Iterable):
            raise TypeError("names_filter must be a site name, a list of names or a predicate fn(name) -> bool, "
                            f"not {type(names).__name__}")
        names = list(names)
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"site names must be strings, not {type(n).__name__} ({n!r})")
            if n not in self.site_order:
                raise self._unknown(n)
        return sorted(set(names), key=self.site_order.__getitem__)

    def extra_hook_names(self, listed: bool = False) -> list[str]:
        """Hookable names that are not graph sites (``listed``: those a predicate may match)."""
        return []

    @property
    def site_order(self) -> dict[str, int]:
        """Hookable name -> its index in ``all_hook_names`` (rebuilt when that list changes)."""
        names, cached = self.all_hook_names, getattr(self, "_site_order_memo", None)
        if cached is None or cached[0] is not names or len(cached[1]) != len(names):
            cached = (names, {n: i for i, n in enumerate(names)})
            object.__setattr__(self, "_site_order_memo", cached)
        return cached[1]

    @property
    def all_hook_names_set(self) -> frozenset[str]:
        return frozenset(self.site_order)

    def hook_entries(self, hooks: HookList | None, dir: str, permanent: bool = False) -> list[Hook]:
        """Checked :class:`Hook` entries for ``[(name or predicate, fn)]`` (raises before registering)."""
        if hooks is None:
            return []
        if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
            raise TypeError(f"{dir}_hooks must be a list of (name or predicate, fn) pairs, not {type(hooks).__name__}")
        out = []
        for item in hooks:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise TypeError(f"each {dir} hook must be a (name or predicate, fn) pair, not {item!r}")
            name, fn = item
            if not (isinstance(name, str) or callable(name)):
                raise TypeError(f"a hook's name must be a site name or a predicate fn(name) -> bool, "
                                f"not {type(name).__name__} ({name!r})")
            extra = self.extra_hook_names(listed=callable(name))
            if isinstance(name, str) and name in extra:
                sites = [name]
            else:
                sites = self.resolve(name if callable(name) else [name]) + [n for n in extra if callable(name)
                                                                            and name(n)]
            out += [Hook(site, fn, dir, permanent) for site in sites]
        return out

    # -- hooks --------------------------------------------------------------------------
    @contextmanager
    def hooks(self, fwd_hooks: HookList = (), bwd_hooks: HookList = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator:
        """Context in which ``fwd_hooks`` / ``bwd_hooks`` are active (TransformerLens' ``hooks``).

        The hooks are seen only by this thread / context, and leaving the context removes exactly
        them (outer contexts and model-wide hooks stay). With ``reset_hooks_end=False`` they are
        added model-wide instead and stay until ``reset_hooks``.
        """
        entries = self.hook_entries(fwd_hooks, "fwd") + self.hook_entries(bwd_hooks, "bwd")
        try:
            if reset_hooks_end:
                with self._hooks.context(entries):
                    yield self
            else:
                self._hooks.add_shared(entries)
                yield self
        finally:
            if clear_contexts:
                for site in {h.site for h in entries}:
                    self._hooks.point(site).ctx.clear()

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd",
                 is_permanent: bool = False, level: int | None = None, prepend: bool = False) -> None:
        """Add a model-wide hook, seen by every call until :meth:`reset_hooks` (TL's ``add_hook``).

        ``is_permanent`` hooks survive ``reset_hooks()`` unless ``including_permanent=True``;
        ``prepend`` runs it before the hooks already at that site. ``level`` is accepted for
        TransformerLens compatibility and ignored: contexts remove exactly their own hooks.
        """
        self._hooks.add_shared(self.hook_entries([(name, hook)], dir, is_permanent), prepend=prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd") -> None:
        """A permanent hook (kept by ``reset_hooks()``)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        """Remove hooks, model-wide and in the current context (permanent ones only if asked)."""
        self._hooks.reset(dir=direction, including_permanent=including_permanent, clear_contexts=clear_contexts)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        """TL's name for :meth:`reset_hooks` without clearing ``hook.ctx``."""
        self._hooks.reset(dir=direction, including_permanent=including_permanent)

    def clear_contexts(self) -> None:
        """Empty every site's ``hook.ctx``."""
        for name in self.all_hook_names:
            self._hooks.point(name).ctx.clear()

    def active_hooks(self, dir: str = "fwd") -> list[tuple[str, HookFn]]:
        """``[(site, fn)]`` visible to this thread/context now, in the order they run."""
        return [(h.site, h.fn) for h in self._hooks.entries() if h.dir == dir]

    def hook_point(self, name: str) -> HookPoint:
        """The :class:`HookPoint` of site ``name`` (what hook functions receive as ``hook``)."""
        if name not in self.all_hook_names_set:
            raise self._unknown(name)
        return self._hooks.point(name)

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Site name -> :class:`HookPoint` (TransformerLens' ``hook_dict``)."""
        return {n: self._hooks.point(n) for n in self.all_hook_names}

    @property
    def mod_dict(self) -> dict[str, HookPoint]:
        """TransformerLens' ``mod_dict``: here the hook points (fxlens has no wrapper modules)."""
        return self.hook_dict

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())
