"""``FactoredMatrix``: a matrix kept as a product ``A @ B`` of two thin factors.

Circuits such as ``W_V @ W_O`` (OV) and ``W_Q @ W_K.T`` (QK) are ``[d_model, d_model]`` but of
rank ``d_head``; keeping the factors makes SVD, norms and eigenvalues cheap. Semantics follow
TransformerLens: leading dims broadcast, ``Vh`` is returned un-transposed (``M == U @ diag(S) @ Vh.T``).
"""

from __future__ import annotations

from functools import cached_property

import torch


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


class FactoredMatrix:
    """``M = A @ B`` with ``A: [..., ldim, mdim]`` and ``B: [..., mdim, rdim]``.

    Args:
        A: left factor.
        B: right factor; leading dims broadcast against ``A``'s.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dims differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(f"leading dims do not broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}") from e
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.A = A.broadcast_to(*lead, self.ldim, self.mdim)
        self.B = B.broadcast_to(*lead, self.mdim, self.rdim)
        self.shape = torch.Size((*lead, self.ldim, self.rdim))

    # -- products ---------------------------------------------------------------
    @property
    def AB(self) -> torch.Tensor:
        """The full product ``[..., ldim, rdim]`` (can be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product ``[..., mdim, mdim]``; needs ``ldim == rdim``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix; shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, still factored."""
        return FactoredMatrix(_t(self.B), _t(self.A))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``."""
        return self.A, self.B

    def __matmul__(self, other: torch.Tensor | FactoredMatrix) -> FactoredMatrix | torch.Tensor:
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:  # a vector: collapse
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply {tuple(self.shape)} by {tuple(other.shape)}")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: torch.Tensor) -> FactoredMatrix | torch.Tensor:
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} by {tuple(self.shape)}")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | torch.Tensor) -> FactoredMatrix:
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError("* takes a scalar; use @ for matrix products")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # -- spectra ------------------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, _t(Vhm @ Vhb)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, Vh)`` with ``M == U @ diag(S) @ Vh.T`` (TransformerLens' convention).

        Shapes ``[..., ldim, k]``, ``[..., k]``, ``[..., rdim, k]`` with ``k = min(ldim, mdim, rdim)``.
        """
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors ``[..., ldim, k]``."""
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        """Singular values ``[..., k]``, descending."""
        return self._svd[1]

    @property
    def Vh(self) -> torch.Tensor:
        """Right singular vectors as columns ``[..., rdim, k]``."""
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Non-trivial eigenvalues of ``AB`` (those of ``BA``), complex ``[..., mdim]``."""
        ba = self.BA
        return torch.linalg.eigvals(ba.float() if ba.dtype in (torch.float16, torch.bfloat16) else ba)

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``[...]`` from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S), sqrt(S) Vh.T)``: balanced, orthogonal factors."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.Vh))

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ Vh.T``: the matrix with the left orthogonal factor removed ``[..., k, rdim]``."""
        return self.S[..., :, None] * _t(self.Vh)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)``: the matrix with the right orthogonal factor removed ``[..., ldim, k]``."""
        return self.U * self.S[..., None, :]

    # -- shape ----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of dims of the full matrix."""
        return len(self.shape)

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """Insert a dim into both factors (use it for leading dims)."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k x k`` corner of the full matrix (and of each leading index up to ``k``)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(0, k) for _ in range(corner.ndim))]

    def __getitem__(self, idx) -> FactoredMatrix:
        """Index leading dims; one or two extra indices select rows / columns of the matrix."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_lead = len(self.shape) - 2
        used = len([i for i in idx if i is not None])
        if used <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        keep = [slice(i, i + 1) if isinstance(i, int) else i for i in idx[n_lead:]]  # matrix dims stay 2-D
        lead = tuple(idx[:n_lead])
        if used == n_lead + 1:
            return FactoredMatrix(self.A[(*lead, keep[0])], self.B[lead])
        if used == n_lead + 2:
            return FactoredMatrix(self.A[(*lead, keep[0])], self.B[(*lead, slice(None), keep[1])])
        raise IndexError(f"{idx} is too long for a FactoredMatrix of shape {tuple(self.shape)}")

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"
