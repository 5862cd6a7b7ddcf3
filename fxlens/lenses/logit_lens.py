"""The ``Lens`` interface, the logit lens, and the residual stream a lens reads.

Layer indices follow tuned-lens: the residual stream at layer ``i`` is ``blocks.i.hook_resid_pre``
for ``0 <= i < n_layers`` (``i = 0`` is the embedding output) and the last block's
``hook_resid_post`` for ``i = n_layers`` (the model's final residual, which every lens decodes to the
model's own logits).
"""

from __future__ import annotations

import torch
from torch import nn

from .unembed import Unembed


def resid_name(model, layer: int) -> str:
    """Site name of the residual stream at lens layer ``layer`` (``0 .. n_layers``)."""
    n = model.cfg.n_layers
    if not 0 <= layer <= n:
        raise IndexError(f"lens layer {layer} out of range: this model has layers 0..{n}")
    return f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"


def residual_stream(model, tokens: torch.Tensor, *, final: bool = True,
                    attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One cached forward: ``(logits, [resid at layer 0, 1, ..., n_layers])``.

    Only the residual sites are cached. With ``final=False`` the last entry (the final residual,
    which the model's logits already decode) is left out.
    """
    n = model.cfg.n_layers
    names = [resid_name(model, i) for i in range(n + (1 if final else 0))]
    with torch.no_grad():  # the model is frozen: no autograd graph through it
        logits, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask)
    return logits, [cache[s] for s in names]


class Lens(nn.Module):
    """Decodes a residual-stream vector of any layer into logits: ``lens(h, layer)``.

    Subclasses define :meth:`transform_hidden`; decoding goes through the frozen :class:`Unembed`.
    """

    def __init__(self, unembed: Unembed, n_layers: int):
        super().__init__()
        self.unembed = unembed
        self.n_layers = n_layers

    def _check(self, idx: int) -> None:
        if not 0 <= idx <= self.n_layers:
            raise IndexError(f"lens layer {idx} out of range 0..{self.n_layers}")

    def transform_hidden(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """Map the residual of layer ``idx`` to what the final norm should read."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """Residual ``[..., d_model]`` of layer ``idx`` -> logits ``[..., d_vocab]``."""
        return self.unembed(self.transform_hidden(h, idx))

    def normalized(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """What the unembedding reads for layer ``idx`` (transform, then final norm)."""
        return self.unembed.normalize(self.transform_hidden(h, idx))

    def __len__(self) -> int:
        return self.n_layers


class LogitLens(Lens):
    """The logit lens: decode any layer's residual with the model's final norm and unembedding.

    Example:
        >>> lens = LogitLens(model)                                   # doctest: +SKIP
        >>> logits, stream = residual_stream(model, tokens)           # doctest: +SKIP
        >>> lens(stream[5], 5).shape  # [batch, pos, d_vocab]        # doctest: +SKIP
    """

    def __init__(self, model=None, *, unembed: Unembed | None = None, n_layers: int | None = None):
        if unembed is None:
            if model is None:
                raise ValueError("LogitLens needs a model (or unembed= and n_layers=)")
            unembed = Unembed(model)
        super().__init__(unembed, model.cfg.n_layers if n_layers is None else n_layers)

    def transform_hidden(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """The identity: the logit lens reads the residual as is."""
        self._check(idx)
        return h
