"""Save and load tuned lenses: fxlens' format and the tuned-lens package's format.

Both are a folder holding ``config.json`` (:class:`TunedLensConfig` fields, the same in both) and
the translator weights, keyed ``"{layer}.weight"`` / ``"{layer}.bias"``:

- fxlens: ``params.safetensors`` (config.json also records ``"format": "fxlens"``);
- tuned-lens 0.2: ``params.pt`` (a pickled ``state_dict``). It is read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers,
  so a lens file cannot run code.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .tuned_lens import TunedLens, TunedLensConfig

SAFETENSORS, PICKLE, CONFIG = "params.safetensors", "params.pt", "config.json"
FORMATS = ("fxlens", "tuned-lens")


def save_lens(lens: TunedLens, path: str | Path, format: str = "fxlens") -> Path:
    """Write ``lens`` to the folder ``path`` in ``format`` (``"fxlens"`` or ``"tuned-lens"``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown lens format {format!r}; use one of {FORMATS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in lens.layer_translators.state_dict().items()}
    config = lens.config.to_dict()
    if format == "fxlens":
        save_file(state, str(path / SAFETENSORS), metadata={"format": "pt"})
        config["format"] = "fxlens"
        (path / PICKLE).unlink(missing_ok=True)
    else:
        torch.save(state, path / PICKLE)
        (path / SAFETENSORS).unlink(missing_ok=True)
    (path / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def _read_config(file: Path) -> TunedLensConfig:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): it is truncated or corrupted; save the lens again") from e
    try:
        if isinstance(raw, dict):
            raw.pop("format", None)
        return TunedLensConfig.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.name == SAFETENSORS:
        try:
            return load_file(str(file))
        except Exception as e:  # SafetensorError: truncated or not safetensors
            raise ValueError(f"{file} cannot be read ({e}): it is truncated or corrupted; save the lens again") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # garbage bytes, not a refused object
            raise ValueError(f"{file} cannot be read ({e}): it is truncated or corrupted; save the lens again") from e
        raise ValueError(f"{file} holds more than tensors and was not loaded "
                         f"(weights_only=True refuses pickled code): {e}") from e
    except Exception as e:  # a truncated zip archive, an empty file, not a torch file at all
        raise ValueError(f"{file} cannot be read ({type(e).__name__}: {e}): it is truncated or corrupted; "
                         "save the lens again") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a state_dict of tensors")
    return state


def read_lens(path: str | Path) -> tuple[TunedLensConfig, dict[str, torch.Tensor]]:
    """``(config, translator state_dict)`` from a lens folder of either format.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file for a missing, truncated or
    ill-typed file.
    """
    path = Path(path)
    if not (path / CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a lens folder: no {CONFIG} (train one with `fxlens lens train`)")
    config = _read_config(path / CONFIG)
    weights = next((path / f for f in (SAFETENSORS, PICKLE) if (path / f).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has {CONFIG} but neither {SAFETENSORS} nor {PICKLE}")
    state = _read_weights(weights)
    # Older tuned-lens checkpoints prefix translator keys with "layer_translators." or hold the unembed too.
    state = {k.removeprefix("layer_translators."): v for k, v in state.items() if not k.startswith("unembed.")}
    return config, state


def load_lens(model, path: str | Path) -> TunedLens:
    """Load a lens folder (either format) for ``model``; warns if the unembedding hash differs."""
    config, state = read_lens(path)
    if config.num_hidden_layers != model.cfg.n_layers or config.d_model != model.cfg.d_model:
        raise ValueError(f"lens at {path} is for {config.num_hidden_layers} layers x d_model {config.d_model}; "
                         f"the model has {model.cfg.n_layers} x {model.cfg.d_model}")
    lens = TunedLens(model, config=config)
    if not lens.unembedding_matches():
        warnings.warn(f"the lens at {path} was trained through a different unembedding "
                      f"(hash {str(config.unembed_hash)[:12]}...): its predictions may be meaningless", stacklevel=2)
    target = lens.layer_translators[0].weight
    try:
        lens.layer_translators.load_state_dict({k: v.to(target.device, target.dtype) for k, v in state.items()})
    except RuntimeError as e:  # missing / unexpected keys, wrong shapes
        raise ValueError(f"the weights in {path} do not match its {CONFIG} ({config.num_hidden_layers} layers x "
                         f"d_model {config.d_model}, bias={config.bias}): {e}") from e
    return lens
