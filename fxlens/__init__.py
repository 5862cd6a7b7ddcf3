"""fxlens: TransformerLens-style hooks, caches and lenses on unmodified HuggingFace models."""

from .cache import ActivationCache, act_name
from .config import ModelConfig
from .hooks import HookPoint
from .loading import from_pretrained, offline_model_path, trace
from .model import HookedModel
from .tracer.capture import CaptureError
from .tracer.locate import SiteError

__all__ = [
    "ActivationCache", "CaptureError", "HookPoint", "HookedModel", "ModelConfig", "SiteError",
    "act_name", "from_pretrained", "offline_model_path", "trace",
]
__version__ = "0.1.0"
