"""``TunedLens``: one zero-initialised affine translator per layer, added residually (Belrose et al. 2023)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .logit_lens import Lens
from .unembed import Unembed


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


class TunedLens(Lens):
    """Logit lens plus a learned affine translator per layer: ``lens(h, i) = unembed(h + A_i h + b_i)``.

    Translators start at zero, so a fresh lens equals the logit lens exactly; weight decay pulls
    them back towards the identity map. The final layer (``i = n_layers``) has no translator.
    The unembedding and final norm are frozen; only ``layer_translators`` are parameters
    (their ``state_dict`` is the tuned-lens ``params.pt`` layout: ``"{i}.weight"``, ``"{i}.bias"``).

    Args:
        model: a traced :class:`fxlens.HookedModel` (or pass ``unembed`` and ``config``).
        bias: translators with a bias (default True).
    """

    def __init__(self, model=None, *, bias: bool = True, unembed: Unembed | None = None,
                 config: TunedLensConfig | None = None):
        if unembed is None:
            if model is None:
                raise ValueError("TunedLens needs a model (or unembed= and config=)")
            unembed = Unembed(model)
        if config is None:
            if model is None:
                raise ValueError("TunedLens(unembed=...) also needs config=")
            config = TunedLensConfig(
                base_model_name_or_path=str(getattr(model.hf_model.config, "name_or_path", "") or ""),
                d_model=model.cfg.d_model, num_hidden_layers=model.cfg.n_layers, bias=bias)
        if config.d_model != unembed.d_model:
            raise ValueError(f"lens d_model {config.d_model} != model d_model {unembed.d_model}: "
                             "this lens was trained on another model")
        super().__init__(unembed, config.num_hidden_layers)
        self.config = config
        config.unembed_hash = config.unembed_hash or unembed.unembedding_hash()
        dtype = unembed.weight.dtype if unembed.weight.is_floating_point() else torch.float32
        self.layer_translators = nn.ModuleList(
            nn.Linear(config.d_model, config.d_model, bias=config.bias, dtype=dtype, device=unembed.weight.device)
            for _ in range(config.num_hidden_layers))
        with torch.no_grad():
            for t in self.layer_translators:
                t.weight.zero_()
                if t.bias is not None:
                    t.bias.zero_()

    @classmethod
    def from_model(cls, model, bias: bool = True) -> TunedLens:
        """A zero-initialised lens for ``model`` (equal to the logit lens)."""
        return cls(model, bias=bias)

    @classmethod
    def from_pretrained(cls, model, path: str | Path) -> TunedLens:
        """Load a lens saved by :meth:`save` (safetensors) or by the tuned-lens package (``params.pt``)."""
        from .io import load_lens
        return load_lens(model, path)

    def save(self, path: str | Path, format: str = "fxlens") -> Path:
        """Save to a folder: ``format="fxlens"`` (config.json + params.safetensors) or ``"tuned-lens"``
        (config.json + params.pt, loadable by the tuned-lens package)."""
        from .io import save_lens
        return save_lens(self, path, format=format)

    def __getitem__(self, idx: int) -> nn.Module:
        return self.layer_translators[idx]

    def transform_hidden(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """``h + A_idx h + b_idx`` (identity at the final layer)."""
        self._check(idx)
        if idx == self.n_layers:
            return h
        t = self.layer_translators[idx]
        h = h.to(t.weight.device, t.weight.dtype)
        return h + t(h)

    def transform_layers(self, hs: torch.Tensor) -> torch.Tensor:
        """:meth:`transform_hidden` of every translated layer at once: ``hs[i]`` is layer ``i``'s residual,
        ``[n_layers, ..., d_model]`` -> same shape (one batched matmul instead of one per layer)."""
        if hs.shape[0] != self.n_layers:
            raise ValueError(f"expected the residuals of layers 0..{self.n_layers - 1} stacked ({self.n_layers}), "
                             f"got {hs.shape[0]}")
        ts = self.layer_translators
        w = torch.stack([t.weight for t in ts])  # [L, out, in]
        flat = hs.to(w.device, w.dtype).reshape(self.n_layers, -1, hs.shape[-1])
        if ts[0].bias is not None:
            out = torch.baddbmm(torch.stack([t.bias for t in ts]).unsqueeze(1), flat, w.transpose(1, 2))
        else:
            out = torch.bmm(flat, w.transpose(1, 2))
        return (flat + out).reshape(hs.shape)

    def unembedding_matches(self) -> bool:
        """Whether the model's unembedding is the one the lens was trained through."""
        return self.config.unembed_hash in (self.unembed.unembedding_hash(), self.unembed.legacy_hash())
