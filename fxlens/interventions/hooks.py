"""Hook points and the hook runner: moved to :mod:`fxlens.hooks` (kept as an import path)."""

from ..hooks import HookFn, HookPoint, run_hook

__all__ = ["HookFn", "HookPoint", "run_hook"]
