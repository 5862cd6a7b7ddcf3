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


def test_tl_names_trace_repr_and_negative_indices(fm):
    dense = fm.AB
    U, S, V = fm.svd()
    assert fm.V is V and fm.Vh is V and fm.has_leading_dims
    torch.testing.assert_close(fm.trace(), dense.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert repr(fm) == "FactoredMatrix: Shape(torch.Size([3, 10, 10])), Hidden Dim(4)"
    torch.testing.assert_close(fm[-1, -1, -1].AB, dense[-1, -1:, -1:])  # -1 keeps the last row / column
    torch.testing.assert_close(fm[..., 2:5].AB, dense[..., 2:5])
    torch.testing.assert_close(fm[1, ..., 3].AB, dense[1, :, 3:4])
    torch.testing.assert_close(fm[:, [0, 2], 1:3].AB, dense[:, [0, 2], 1:3])
    torch.testing.assert_close(fm[torch.tensor(1)].AB, dense[1])
    with pytest.raises(IndexError, match="too long"):
        fm[0, 0, 0, 0]
    with pytest.raises(ValueError, match="square"):
        FactoredMatrix(torch.randn(3, 2), torch.randn(2, 4)).trace()


def test_half_precision_factors_are_upcast_for_linalg():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(6, 3, generator=g), torch.randn(3, 6, generator=g)
    half = FactoredMatrix(A.bfloat16(), B.bfloat16())
    ref = FactoredMatrix(A.bfloat16().float(), B.bfloat16().float())
    torch.testing.assert_close(half.S, ref.S)
    torch.testing.assert_close(half.eigenvalues, torch.linalg.eig((B.bfloat16() @ A.bfloat16()).float()).eigenvalues)


def test_ov_copying_scores_from_factored_eigenvalues():
    """The Main Demo's OV copying score on a tiny model: eigenvalues of the factored OV equal the dense ones."""
    from tests.conftest import traced

    m = traced("gpt2")
    ov = m.OV
    assert ov.shape == (m.cfg.n_layers, m.cfg.n_heads, m.cfg.d_model, m.cfg.d_model)
    ev = ov.eigenvalues
    score = ev.sum(-1).real / ev.abs().sum(-1)
    dense = torch.linalg.eigvals(ov.AB.double())
    top = dense.abs().argsort(-1, descending=True)[..., : m.cfg.d_head]  # the rank-d_head non-zero part
    nz = dense.gather(-1, top)
    torch.testing.assert_close(score.double(), nz.sum(-1).real / nz.abs().sum(-1), atol=1e-4, rtol=1e-4)
    full = m.W_E @ ov @ m.W_U  # [L, H, d_vocab, d_vocab], factored through d_head
    assert full.shape[-2:] == (m.cfg.d_vocab, m.cfg.d_vocab) and full.mdim == m.cfg.d_head
    torch.testing.assert_close(full.AB[0, 0], m.W_E @ ov.AB[0, 0] @ m.W_U, atol=1e-4, rtol=1e-4)
