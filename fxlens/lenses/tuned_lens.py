"""``TunedLens``: one zero-initialised affine translator per layer, added residually (Belrose et al. 2023)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .io import CONFIG, TunedLensConfig, read_lens, write_lens
from .logit_lens import Lens
from .unembed import Unembed


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
        return load_lens(model, path)

    def save(self, path: str | Path, format: str = "fxlens") -> Path:
        """Save to a folder: ``format="fxlens"`` (config.json + params.safetensors) or ``"tuned-lens"``
        (config.json + params.pt, loadable by the tuned-lens package)."""
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


def save_lens(lens: TunedLens, path: str | Path, format: str = "fxlens") -> Path:
    """Write ``lens`` to the folder ``path`` in ``format`` (``"fxlens"`` or ``"tuned-lens"``)."""
    return write_lens(path, lens.config, lens.layer_translators.state_dict(), format)


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
