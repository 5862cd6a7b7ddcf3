"""FactoredMatrix against the dense product."""

from __future__ import annotations

import pytest
import torch

from fxlens.interventions.factored_matrix import FactoredMatrix


@pytest.fixture
def fm() -> FactoredMatrix:
    g = torch.Generator().manual_seed(0)
    return FactoredMatrix(torch.randn(3, 10, 4, generator=g, dtype=torch.float64),
                          torch.randn(4, 10, generator=g, dtype=torch.float64))


def test_shapes_and_products(fm):
    assert fm.shape == (3, 10, 10) and (fm.ldim, fm.mdim, fm.rdim) == (10, 4, 10) and fm.ndim == 3
    dense = fm.A @ fm.B
    torch.testing.assert_close(fm.AB, dense)
    torch.testing.assert_close(fm.T.AB, dense.transpose(-2, -1))
    torch.testing.assert_close(fm.BA, fm.B @ fm.A)
    x = torch.randn(10, 7, dtype=torch.float64)
    torch.testing.assert_close((fm @ x).AB, dense @ x)
    torch.testing.assert_close((x.T @ fm).AB, x.T @ dense)
    v = torch.randn(10, dtype=torch.float64)
    torch.testing.assert_close(fm @ v, dense @ v)
    torch.testing.assert_close(v @ fm, v @ dense)
    torch.testing.assert_close((fm @ fm).AB, dense @ dense)
    torch.testing.assert_close((fm * 2.5).AB, 2.5 * dense)
    torch.testing.assert_close((2.5 * fm).AB, 2.5 * dense)


def test_svd_norm_eigenvalues(fm):
    dense = fm.AB
    U, S, Vh = fm.svd()
    assert U.shape == (3, 10, 4) and S.shape == (3, 4) and Vh.shape == (3, 10, 4)
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh.transpose(-2, -1), dense)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:, :4])
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    ev = fm.eigenvalues
    dense_ev = torch.linalg.eigvals(dense)
    for i in range(3):  # the 4 non-trivial eigenvalues appear among the dense ones
        for e in ev[i]:
            assert (dense_ev[i] - e).abs().min() < 1e-8
    torch.testing.assert_close(fm.make_even().AB, dense)
    torch.testing.assert_close(fm.U @ fm.collapse_l(), dense)
    torch.testing.assert_close(fm.collapse_r() @ fm.Vh.transpose(-2, -1), dense)


def test_indexing_and_corner(fm):
    dense = fm.AB
    torch.testing.assert_close(fm[1].AB, dense[1])
    torch.testing.assert_close(fm[1, 2:5].AB, dense[1, 2:5])
    torch.testing.assert_close(fm[1, 2, 3].AB, dense[1, 2:3, 3:4])
    torch.testing.assert_close(fm.get_corner(2), dense[:2, :2, :2])
    assert fm.unsqueeze(0).shape == (1, 3, 10, 10)
    with pytest.raises(ValueError, match="inner dims"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 3))
