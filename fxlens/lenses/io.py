"""Save and load tuned lenses: fxlens' format and the tuned-lens package's format.

Both are a folder holding ``config.json`` (:class:`TunedLensConfig` fields, the same in both) and
the translator weights, keyed ``"{layer}.weight"`` / ``"{layer}.bias"``:

- fxlens: ``params.safetensors`` (config.json also records ``"format": "fxlens"``);
- tuned-lens 0.2: ``params.pt`` (a pickled ``state_dict``). It is read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers,
  so a lens file cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAFETENSORS, PICKLE, CONFIG = "params.safetensors", "params.pt", "config.json"
FORMATS = ("fxlens", "tuned-lens")


@dataclass
class TunedLensConfig:
    """The lens configuration stored in ``config.json`` (tuned-lens 0.2's fields, same names).

    Unknown keys are ignored with a warning when read, so configs move between versions and tools.
    """

    base_model_name_or_path: str
    """The model the lens was trained on (HF name or path)."""
    d_model: int
    """Residual width."""
    num_hidden_layers: int
    """Number of translators: one per lens layer ``0 .. n_layers - 1``."""
    bias: bool = True
    """Whether the translators have a bias."""
    base_model_revision: str | None = None
    """Revision of the base model, if known."""
    unembed_hash: str | None = None
    """SHA-256 of the unembedding matrix the lens was trained through."""
    lens_type: str = "linear_tuned_lens"
    """Lens kind (tuned-lens' name)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TunedLensConfig:
        """Build from a ``config.json`` object; every field's JSON type is checked (``ValueError`` names it)."""
        if not isinstance(d, dict):
            raise ValueError(f"a lens config is a JSON object of settings, not a {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"ignoring unknown lens config keys {unknown}", stacklevel=2)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"lens config lacks required keys {missing}")
        for name, value in d.items():
            if name in names:
                _check_field(name, value)
        if d.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
            raise ValueError(f"lens_type {d['lens_type']!r} is not supported: only 'linear_tuned_lens'")
        return cls(**{k: v for k, v in d.items() if k in names})


#: field -> (accepted Python types of the JSON value, how to write it, whether null is allowed)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str, bool]] = {
    "base_model_name_or_path": ((str,), 'a string such as "HuggingFaceTB/SmolLM2-135M"', False),
    "d_model": ((int,), "a positive integer such as 576 (no quotes, no decimal point)", False),
    "num_hidden_layers": ((int,), "a positive integer such as 30 (no quotes, no decimal point)", False),
    "bias": ((bool,), "true or false (JSON booleans, no quotes)", False),
    "base_model_revision": ((str,), "a string or null", True),
    "unembed_hash": ((str,), "a string or null", True),
    "lens_type": ((str,), 'the string "linear_tuned_lens"', False),
}


def _check_field(name: str, value) -> None:
    types, how, nullable = _FIELD_TYPES[name]
    if value is None and nullable:
        return
    right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))  # True is an int
    if not right_type or (int in types and value < 1):
        raise ValueError(f"lens config field {name!r} must be {how}, not {value!r} ({type(value).__name__})")


def write_lens(path: str | Path, config: TunedLensConfig, state: dict[str, torch.Tensor],
               format: str = "fxlens") -> Path:
    """Write a lens folder: ``config`` and the translator ``state`` in ``format`` (``"fxlens"`` or ``"tuned-lens"``)."""
    if format not in FORMATS:
        raise ValueError(f"unknown lens format {format!r}; use one of {FORMATS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = config.to_dict()
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
