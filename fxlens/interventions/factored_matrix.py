"""``FactoredMatrix``: a matrix kept as a product ``A @ B`` of two thin factors.

Circuits such as ``W_V @ W_O`` (OV) and ``W_Q @ W_K.T`` (QK) are ``[d_model, d_model]`` but of
rank ``d_head``; keeping the factors makes SVD, norms and eigenvalues cheap. Semantics follow
TransformerLens 4.3: leading dims broadcast, ``svd()`` gives ``(U, S, V)`` with ``M == U @ diag(S) @ V.T``
(``Vh`` is TL's old name for ``V``).
"""

from __future__ import annotations

from functools import cached_property

import torch


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-2, -1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 to float32: ``torch.linalg``'s SVD and eig have no 16-bit kernels."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _keep(i):
    """An int row / column index as a length-1 slice (``-1`` included), so the matrix stays 2-D."""
    if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.dtype.is_floating_point and i.dtype != torch.bool:
        i = int(i)
    if isinstance(i, int) and not isinstance(i, bool):
        return slice(i, i + 1 if i != -1 else None)
    return i


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
        A, B = _upcast(self.A), _upcast(self.B)
        Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
        middle = Sa[..., :, None] * (Vha @ Ub) * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, _t(Vhm @ Vhb)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` with ``M == U @ diag(S) @ V.T`` (TransformerLens' convention; 16-bit factors upcast).

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
    def V(self) -> torch.Tensor:
        """Right singular vectors as columns ``[..., rdim, k]``: ``M == U @ diag(S) @ V.T``."""
        return self._svd[2]

    @property
    def Vh(self) -> torch.Tensor:
        """TL's old name for :attr:`V` (it is V, not its transpose)."""
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Non-trivial eigenvalues of ``AB`` (those of ``BA``), complex ``[..., mdim]``."""
        return torch.linalg.eig(_upcast(self.BA)).eigenvalues

    def trace(self) -> torch.Tensor:
        """``trace(AB) == trace(BA)`` ``[...]``, without forming ``AB`` (needs a square matrix)."""
        if self.ldim != self.rdim:
            raise ValueError(f"trace needs a square matrix; shape is {tuple(self.shape)}")
        return (self.A * _t(self.B)).sum((-2, -1))

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``[...]`` from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S), sqrt(S) V.T)``: balanced, orthogonal factors."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ V.T``: the matrix with the left orthogonal factor removed ``[..., k, rdim]``."""
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)``: the matrix with the right orthogonal factor removed ``[..., ldim, k]``."""
        return self.U * self.S[..., None, :]

    # -- shape ----------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of dims of the full matrix."""
        return len(self.shape)

    @property
    def has_leading_dims(self) -> bool:
        return self.ndim > 2

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """Insert a dim into both factors (use it for leading dims)."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left ``k x k`` corner of the full matrix (and of each leading index up to ``k``)."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(0, k) for _ in range(corner.ndim))]

    def __getitem__(self, idx) -> FactoredMatrix:
        """Index as the full matrix, without forming it: leading dims, then rows, then columns (an int
        row / column index keeps its dim, as TL; ``...`` expands)."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is None for i in idx):
            raise IndexError("FactoredMatrix indexing does not take None (new axes): unsqueeze instead")
        if sum(i is Ellipsis for i in idx) > 1:
            raise IndexError("an index can only have a single ellipsis")
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (self.ndim - len(idx) + 1) + idx[at + 1:]
        n_lead = self.ndim - 2
        if len(idx) > self.ndim:
            raise IndexError(f"{idx} is too long an index for a FactoredMatrix of shape {tuple(self.shape)}")
        lead, mat = idx[:n_lead], [_keep(i) for i in idx[n_lead:]]
        if not mat:
            return FactoredMatrix(self.A[lead], self.B[lead])
        if len(mat) == 1:
            return FactoredMatrix(self.A[(*lead, mat[0])], self.B[lead])
        return FactoredMatrix(self.A[(*lead, mat[0])], self.B[(*lead, slice(None), mat[1])])

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"
