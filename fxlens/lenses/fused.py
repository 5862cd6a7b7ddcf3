"""Chunked, fused unembedding statistics: ``logsumexp`` of the lens logits and its gradient, no ``[T, V]`` copies.

For ``z = s · (W x + b)`` (the unembedding of a normalised residual ``x``, scale ``s``) and a target
distribution ``p`` over the vocabulary, linearity gives

- ``p · z = s · (x · (pᵀW) + p · b)``: the target term needs only ``pᵀW`` (``[T, d]``, once per batch,
  shared by every layer), never ``p`` itself per layer;
- ``∂ KL(p ‖ softmax z) / ∂x = s · (softmax(z) W − pᵀW)``.

So per layer only ``z`` is materialised, a block of rows at a time, in one reused buffer: one matmul,
a row max, ``exp`` in place, a row sum, and (for the gradient) one matmul back. Nothing is
approximated: the values are those of ``log_softmax`` + autograd up to float summation order.
With ``bf16=True`` the two matmuls run in bfloat16 (autocast-style: the softmax statistics and all
accumulation stay float32). Soft-capped logits (Gemma 2/3) are not linear in ``x``:
:func:`supported` is False for them and callers take the plain autograd path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .unembed import Unembed

#: Rows of ``z`` computed at once (a ``[rows, d_vocab]`` float32 buffer: 50 MB at 256 x 49152).
DEFAULT_ROWS = 256


def supported(unembed: Unembed) -> bool:
    """Whether the lens logits are affine in the normalised residual (no soft-capping)."""
    return not unembed.softcap


@dataclass
class Target:
    """What the fused KL needs of a target distribution ``p = softmax(logits)`` over ``T`` rows."""

    p_w: torch.Tensor
    """``pᵀW``: ``[T, d]`` float32."""
    p_b: torch.Tensor
    """``p · b``: ``[T]`` float32 (zeros without a bias)."""
    neg_entropy: torch.Tensor
    """``Σ p log p``: ``[T]`` float32."""


class FusedUnembed:
    """The frozen unembedding of a lens, evaluated block by block (see the module docstring).

    Args:
        unembed: the lens' :class:`Unembed` (without soft-capping: check :func:`supported`).
        bf16: run the matmuls in bfloat16 (float32 softmax and accumulation).
        rows: rows of ``z`` per block.
    """

    def __init__(self, unembed: Unembed, *, bf16: bool = False, rows: int = DEFAULT_ROWS):
        if not supported(unembed):
            raise ValueError("soft-capped logits are not affine in the residual: use the autograd path "
                             "(fxlens.lenses.fused.supported(unembed) is False)")
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        w = unembed.weight
        self.dtype = torch.bfloat16 if bf16 else w.dtype
        self.weight = w.to(self.dtype)  # [V, d]; a copy only when the dtype changes
        self.bias = unembed.bias.float() if unembed.bias is not None else None
        self.scale = unembed.logit_scale
        self.rows = rows
        self._buf: torch.Tensor | None = None
        self._buf32: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.weight.shape[0]
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = torch.empty(n, v, dtype=self.dtype, device=self.device)
            self._buf32 = self._buf if self.dtype == torch.float32 else torch.empty(n, v, device=self.device)
        return self._buf[:n], self._buf32[:n]

    def _exp_block(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(e, lse, sum)`` for one block: ``e = exp(z - max z)`` (float32, in the buffer)."""
        buf, b32 = self._buffers(x.shape[0])
        torch.mm(x.to(self.dtype), self.weight.t(), out=buf)
        if b32 is not buf:
            b32.copy_(buf)
        if self.bias is not None:
            b32.add_(self.bias)
        m = b32.amax(-1, keepdim=True)
        b32.sub_(m)
        if self.scale != 1.0:
            b32.mul_(self.scale)
        b32.exp_()
        total = b32.sum(-1)
        return b32, m.squeeze(-1) * self.scale + total.log(), total

    def logsumexp(self, x: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``lse(z)`` per row of ``x`` ``[T, d]`` (float32 ``[T]``), and with ``grad`` ``s · softmax(z) W``."""
        x = x.detach().to(self.device)
        lse = torch.empty(x.shape[0], device=self.device)
        sw = torch.empty(x.shape[0], self.weight.shape[1], device=self.device) if grad else None
        for r in range(0, x.shape[0], self.rows):
            blk = slice(r, min(r + self.rows, x.shape[0]))
            e, lse[blk], total = self._exp_block(x[blk])
            if grad:
                if e.dtype != self.dtype:
                    buf, _ = self._buffers(e.shape[0])
                    buf.copy_(e)
                    e = buf
                torch.mm(e, self.weight, out=sw[blk]) if self.dtype == torch.float32 else \
                    sw[blk].copy_(torch.mm(e, self.weight))
                sw[blk] *= (self.scale / total).unsqueeze(-1)
        return lse, sw

    def logits_dot(self, x: torch.Tensor, w_rows: torch.Tensor, b_rows: torch.Tensor) -> torch.Tensor:
        """``s · (x · w_rows + b_rows)`` per row: ``z`` against given (mixtures of) unembedding rows."""
        return self.scale * (torch.linalg.vecdot(x.detach().to(self.device).float(), w_rows) + b_rows)

    def token_logits(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``z[ids]`` per row (float32): the logit of one given token per row, e.g. the next token."""
        ids = ids.to(self.device)
        w = self.weight[ids].float() if self.dtype != torch.float32 else self.weight[ids]
        b = self.bias[ids] if self.bias is not None else torch.zeros(ids.shape[0], device=self.device)
        return self.logits_dot(x, w, b)

    def target(self, logits: torch.Tensor) -> Target:
        """:class:`Target` of ``softmax(logits)`` for ``[T, V]`` logits (e.g. the model's final ones)."""
        p_w, p_b, neg_h = [], [], []
        w32 = None if self.dtype == torch.float32 else self.weight
        for blk in logits.to(self.device).split(self.rows):
            logp = torch.log_softmax(blk.float(), -1)
            p = logp.exp()
            neg_h.append(torch.linalg.vecdot(p, logp))
            p_b.append(p @ self.bias if self.bias is not None else torch.zeros(p.shape[0], device=self.device))
            p_w.append((p.to(w32.dtype) @ w32).float() if w32 is not None else p @ self.weight)
        return Target(torch.cat(p_w), torch.cat(p_b), torch.cat(neg_h))

    def kl_from_lse(self, x: torch.Tensor, lse: torch.Tensor, target: Target) -> torch.Tensor:
        """Per-row ``KL(p ‖ softmax z)`` given ``lse = logsumexp(z)`` (from :meth:`logsumexp`)."""
        return lse - self.logits_dot(x, target.p_w, target.p_b) + target.neg_entropy

    def kl(self, x: torch.Tensor, target: Target, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row ``KL(p ‖ softmax z)`` for normalised ``x`` ``[T, d]``, and with ``grad`` its gradient in ``x``."""
        lse, sw = self.logsumexp(x, grad)
        kl = self.kl_from_lse(x, lse, target)
        if grad:
            sw -= self.scale * target.p_w
        return kl, sw
