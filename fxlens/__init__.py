"""fxlens: TransformerLens-style hooks, caches and lenses on unmodified HuggingFace models."""

from . import hook_points, utils
from ._version import __version__ as __version__
from .cache import ActivationCache, act_name
from .config import ModelConfig
from .hook_points import HookedRootModule
from .hooked_transformer import HookedTransformer
from .hooks import HookPoint
from .interventions import evals, patching
from .interventions.factored_matrix import FactoredMatrix
from .loading import from_pretrained, offline_model_path, trace
from .model import HookedModel
from .tracer.capture import CaptureError
from .tracer.locate import SiteError

__all__ = [
    "ActivationCache", "CaptureError", "FactoredMatrix", "HookPoint", "HookedModel", "HookedRootModule",
    "HookedTransformer", "ModelConfig", "SiteError", "act_name", "evals", "from_pretrained", "hook_points",
    "offline_model_path", "patching", "trace", "utils",
]
