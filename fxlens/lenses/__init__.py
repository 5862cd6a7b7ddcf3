"""Lenses: decode any layer's residual stream into next-token predictions.

- :class:`LogitLens`: the model's own final norm + unembedding applied to any layer.
- :class:`TunedLens`: a learned affine translator per layer before that (Belrose et al. 2023),
  trained with :func:`train_lens`, evaluated with :func:`evaluate`, saved as safetensors or in the
  tuned-lens package's format.
"""

from .data import TokenChunks, austen_files, text_files, tokenize_chunks
from .eval import LensEval, PredictionTrajectory, evaluate
from .io import TunedLensConfig
from .logit_lens import Lens, LogitLens, resid_name, residual_stream
from .train import TrainConfig, TrainResult, init_distributed, train_lens
from .tuned_lens import TunedLens, load_lens, save_lens
from .unembed import Unembed

__all__ = [
    "Lens", "LensEval", "LogitLens", "PredictionTrajectory", "TokenChunks", "TrainConfig", "TrainResult",
    "TunedLens", "TunedLensConfig", "Unembed", "austen_files", "evaluate", "init_distributed", "load_lens",
    "resid_name", "residual_stream", "save_lens", "text_files", "tokenize_chunks", "train_lens",
]
