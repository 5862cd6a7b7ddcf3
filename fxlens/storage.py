"""Where fxlens keeps files on disk: converted checkpoints and captured graphs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """fxlens' cache folder: ``$FXLENS_CACHE`` or ``~/.cache/fxlens``."""
    return Path(os.environ.get("FXLENS_CACHE", Path.home() / ".cache" / "fxlens"))
