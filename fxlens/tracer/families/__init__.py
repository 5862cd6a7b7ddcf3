"""Registry of family rules, keyed by ``config.model_type``."""

from __future__ import annotations

from .base import Family
from .bert import BERT
from .gemma import GEMMA, GEMMA2
from .gpt2 import GPT2
from .llama import LLAMA
from .neox import NEOX
from .opt import OPT
from .phi3 import PHI3

RULES: dict[str, Family] = {t: f for f in (LLAMA, GEMMA, GEMMA2, GPT2, NEOX, OPT, PHI3, BERT) for t in f.model_types}


def rule_for(model_type: str) -> Family:
    """The family rule for ``model_type``; raises ``KeyError`` naming the known types."""
    try:
        return RULES[model_type]
    except KeyError:
        raise KeyError(
            f"no family rule for model_type {model_type!r}; known: {sorted(RULES)}"
        ) from None


__all__ = ["Family", "RULES", "rule_for"]
