"""Tests written against the mutants of ``certnet.nn.masked_spectral`` that survived
``scripts/mutation.sh`` (the list, with the mutant each test kills and the equivalent ones, is
the ``certnet.nn.masked_spectral`` section of tests/mutation/survivors.md).

test_local_lipschitz.py only checks that each masked bound is at least the exact masked norm on
small random weights, where the 1e-9 slack swallows every rounding charge and boolean masks
hide a division by the mask. These pin the documented contracts both ways: each Frobenius and
Schur bound is the documented quantity (checked in exact rational arithmetic) within 1e-8, per
point; the rounding charges keep every bound above the exact norm where they exceed the slack
(fans of 2.5e7); the Gram split is exact when the trailing spectrum is flat and certifies
nothing for a non-finite weight; the masked bound of a layer is the smallest of its parts and
is computed exactly where few enough neurons are kept."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from certnet.nn import masked_spectral as ms
from certnet.nn.masked_spectral import (
    CONV_KEPT_FRACTION,
    GramTail,
    conv_frobenius,
    conv_masked_bound,
    conv_schur,
    dense_frobenius,
    dense_gram_tails,
    dense_masked_bound,
)
from certnet.nn.spectral import FLOAT64_UNIT_ROUNDOFF

#: the documented tightness: every bound is its quantity rounded up by at most this (relative)
TIGHT = 1e-8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def conv_matrix(weight: torch.Tensor, stride: int, padding: int, shape: tuple[int, ...]
                ) -> torch.Tensor:
    """The dense (out, in) matrix of a convolution on inputs of ``shape`` (every entry is one
    kernel weight or 0, so the matrix of |W| is |A|)."""
    n = torch.Size(shape).numel()
    eye = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return F.conv2d(eye, weight.double(), None, stride, padding).flatten(1).T


def rational(t: torch.Tensor) -> list:
    """Nested lists of exact Fractions of a float64 tensor's entries."""
    return np.vectorize(Fraction, otypes=[object])(t.double().numpy()).tolist()


def exact_frobenius_squared(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                            ) -> Fraction:
    """||diag(r) A diag(c)||_F^2 exactly (r, c: 0/1 vectors)."""
    a = rational(matrix)
    return sum((x * x for i, row in enumerate(a) if rows[i] for j, x in enumerate(row)
                if cols[j]), Fraction(0))


def exact_schur_squared(matrix: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                        ) -> Fraction:
    """||B||_1 ||B||_inf exactly, B = |diag(r) A diag(c)|: max column sum times max row sum."""
    a = rational(matrix.abs())
    kept = [[x if rows[i] and cols[j] else Fraction(0) for j, x in enumerate(row)]
            for i, row in enumerate(a)]
    row_sums = [sum(row, Fraction(0)) for row in kept]
    col_sums = [sum(col, Fraction(0)) for col in zip(*kept, strict=True)]
    return max(row_sums) * max(col_sums)


def assert_rounded_up(bound: torch.Tensor, squares: list[Fraction]) -> None:
    """bound[i] is sqrt(squares[i]) rounded up by at most TIGHT: checked on the squares in
    exact arithmetic (an inf, NaN, or a bound of the whole batch fails)."""
    assert bound.dtype == torch.float64 and bound.shape == (len(squares),)
    for b, s in zip(bound.tolist(), squares, strict=True):
        assert math.isfinite(b)
        got = Fraction(b) ** 2
        assert s <= got <= s * Fraction(1 + TIGHT) ** 2, (b, float(s) ** 0.5)


def exact_masked_norm(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                      ) -> torch.Tensor:
    """||diag(r) W diag(c)||_2 per point by a float64 SVD (relative error ~1e-15)."""
    w = weight.double()
    return torch.stack([torch.linalg.matrix_norm(r.double()[:, None] * w * c.double()[None], 2)
                        for r, c in zip(rows, cols, strict=True)])


# --- helpers: gamma_n and the symmetric norm --------------------------------------------------


@pytest.mark.parametrize("n", [1, 1000, 2**40])
def test_gamma_is_n_u_over_1_minus_n_u(n):
    """gamma_n = n u / (1 - n u), exactly as documented (at n = 2^40 n u = 2^-13, so n u,
    n u / (1 + n u) and n u (1 - n u) differ from it in the fourth digit)."""
    nu = Fraction(n) * Fraction(FLOAT64_UNIT_ROUNDOFF)
    assert Fraction(ms._gamma(n)) == pytest.approx(nu / (1 - nu), rel=1e-15, abs=0)


@pytest.mark.parametrize("matrix", [
    [[3.0]], [[3.0, 0.0], [0.0, -5.0]], [[2.0, 1.0], [1.0, 2.0]], [[-0.25]]])
def test_symmetric_norm_bound_is_the_norm_within_the_slack(matrix):
    """A sound bound on ||S||_2, and (eigvalsh being backward stable) at most the slack above
    it: 1x1 matrices included."""
    s = torch.tensor(matrix, dtype=torch.float64)
    exact = float(np.abs(np.linalg.eigvalsh(s.numpy())).max())  # exact on these matrices
    got = ms._symmetric_norm_bound(s)
    assert got.dtype == torch.float64 and got.shape == ()
    assert exact <= float(got) <= exact * (1 + 2e-9)


def test_symmetric_norm_bound_of_an_empty_matrix_is_a_float64_zero():
    got = ms._symmetric_norm_bound(torch.zeros(0, 0, dtype=torch.float64))
    assert got.dtype == torch.float64 and got.shape == () and float(got) == 0.0


# --- Frobenius and Schur bounds: the documented quantity, per point ---------------------------


def test_dense_frobenius_is_the_masked_frobenius_norm_per_point():
    """sqrt(r^T (W o W) c) per point, rounded up by at most 1e-8 (masks as 0/1 floats, with
    dropped columns: a division by the mask would be inf)."""
    g = gen(0)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64) * 37.0
    rows = (torch.rand(6, 5, generator=g) < 0.6).double()
    cols = (torch.rand(6, 7, generator=g) < 0.6).double()
    rows[0], cols[0] = 1.0, 1.0  # the whole matrix
    cols[1], rows[1] = 0.0, 1.0
    cols[1, 3] = 1.0  # one column
    got = dense_frobenius(w, rows, cols)
    assert_rounded_up(got, [exact_frobenius_squared(w, r, c) for r, c in zip(rows, cols,
                                                                               strict=True)])


CONV_CASES = [  # (c_out, c_in, stride, padding, input hw, batch): single channels and points too
    (1, 1, 1, 1, (5, 4), 1),
    (1, 2, 2, 0, (6, 5), 2),
    (3, 1, 1, 0, (4, 4), 3),
    (3, 2, 2, 1, (5, 6), 3),
]


def conv_case(case, seed):
    c_out, c_in, stride, padding, hw, batch = case
    g = gen(seed)
    kernel = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) * 0.03
    shape = (c_in, *hw)
    out_shape = F.conv2d(torch.zeros(1, *shape, dtype=torch.float64), kernel, None, stride,
                         padding).shape[1:]
    rows = (torch.rand(batch, *out_shape, generator=g) < 0.5).double()
    cols = (torch.rand(batch, *shape, generator=g) < 0.5).double()
    rows[0], cols[0] = 1.0, 1.0  # every point differs from the first
    return kernel, stride, padding, rows, cols, conv_matrix(kernel, stride, padding, shape)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_frobenius_is_the_masked_frobenius_norm_per_point(case):
    kernel, stride, padding, rows, cols, matrix = conv_case(case, 1)
    got = conv_frobenius(kernel, stride, padding, rows, cols)
    assert_rounded_up(got, [exact_frobenius_squared(matrix, r.flatten(), c.flatten())
                            for r, c in zip(rows, cols, strict=True)])


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_schur_is_the_schur_bound_per_point(case):
    """sqrt(||B||_1 ||B||_inf) of B = |diag(r) A diag(c)|, each point's own maxima."""
    kernel, stride, padding, rows, cols, matrix = conv_case(case, 2)
    got = conv_schur(kernel, stride, padding, rows, cols)
    assert_rounded_up(got, [exact_schur_squared(matrix, r.flatten(), c.flatten())
                            for r, c in zip(rows, cols, strict=True)])


# --- rounding charges that matter: fans of 2^25 ------------------------------------------------

#: gamma_n ~ 2.8e-9 at n = 3 * 2^23 exceeds the 1e-9 slack of the square root: a rounding charge
#: that is dropped or subtracted leaves the bound below the exact norm even where every sum is
#: exact (masks of ones as stride-0 views: a third less memory to fill)
BIG = 3 * 2**23


def ones(*shape: int) -> torch.Tensor:
    return torch.ones((1,) * len(shape), dtype=torch.float64).expand(*shape)


def test_dense_frobenius_stays_above_the_norm_of_a_wide_row():
    """W = 3 (1 ... 1), 1 x n: ||W||_2 = ||W||_F = 3 sqrt(n), every float sum exact."""
    w = torch.full((1, BIG), 3.0, dtype=torch.float64)
    got = dense_frobenius(w, ones(1, 1), ones(1, BIG))
    assert Fraction(float(got)) ** 2 >= 9 * BIG
    assert float(got) <= 3 * math.sqrt(BIG) * (1 + TIGHT)


def test_conv_bounds_stay_above_the_norm_of_a_tall_convolution():
    """n output channels of a 1x1 kernel of 3s on one input pixel: A is a column of 3s,
    ||A||_2 = ||A||_F = sqrt(||A||_1 ||A||_inf) = 3 sqrt(n), every float sum exact."""
    kernel = torch.full((BIG, 1, 1, 1), 3.0, dtype=torch.float64)
    rows, cols = ones(1, BIG, 1, 1), ones(1, 1, 1, 1)
    for bound in (conv_frobenius, conv_schur):
        got = bound(kernel, 1, 0, rows, cols)
        assert got.shape == (1,)
        assert Fraction(float(got)) ** 2 >= 9 * BIG, bound.__name__
        assert float(got) <= 3 * math.sqrt(BIG) * (1 + TIGHT), bound.__name__


# --- the Gram split ---------------------------------------------------------------------------


def flat_tail_weight(seed: int) -> torch.Tensor:
    """W = diag(sqrt(lambda)) U^T (6 x 6): G = W^T W = U diag(5, 3, 1/2, 1/2, 1/2, 1/2) U^T
    and H = W W^T = diag(lambda), both with a flat spectrum below the top two."""
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen(seed), dtype=torch.float64))
    lam = torch.tensor([5.0, 3.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    return lam.sqrt()[:, None] * u.T


def test_gram_tail_is_exact_when_the_spectrum_below_rank_k_is_flat():
    """G = P + Q with P = V (Lambda_K - lambda_{K+1}) V^T: when every eigenvalue below the
    top K equals lambda_{K+1}, Q = lambda_{K+1} I and lambda_max(P_SS) + ||Q|| is
    lambda_max(G_SS) itself, for every mask (the split shifted by lambda_{K+1} is what makes
    a rank-K split tight; unshifted it exceeds the norm by up to lambda_{K+1})."""
    w = flat_tail_weight(3)
    g = gen(4)
    masks = torch.cat([torch.eye(6, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64),
                       (torch.rand(20, 6, generator=g) < 0.5).double()])
    ones = torch.ones_like(masks)
    cols_tail, rows_tail = dense_gram_tails(w, 2)
    for got, exact in [(cols_tail.bound(masks), exact_masked_norm(w, ones, masks)),
                       (rows_tail.bound(masks), exact_masked_norm(w, masks, ones))]:
        assert bool((got >= exact).all())
        torch.testing.assert_close(got, exact, rtol=TIGHT, atol=0)


def test_dense_gram_tails_are_the_splits_of_the_given_rank():
    w = torch.randn(10, 12, generator=gen(5), dtype=torch.float64)
    keep_cols = (torch.rand(8, 12, generator=gen(6)) < 0.5).double()
    keep_rows = (torch.rand(8, 10, generator=gen(7)) < 0.5).double()
    cols_tail, rows_tail = dense_gram_tails(w, 3)
    assert cols_tail.scale.numel() == rows_tail.scale.numel() == 3
    assert torch.equal(cols_tail.bound(keep_cols), GramTail.of(w, 3).bound(keep_cols))
    assert torch.equal(rows_tail.bound(keep_rows), GramTail.of(w.T, 3).bound(keep_rows))


@pytest.mark.parametrize("n", [1, 4])
def test_a_rank_zero_split_bounds_every_masked_norm_by_the_norm(n):
    """K = 0: all of G is the rest, bounded by ||G||: the bound is ||W||_2 (within the slack)
    at every mask, in the weight's units (max |W| = 24, not 1); one column included."""
    w = torch.randn(5, n, generator=gen(8), dtype=torch.float64)
    w = w * (24.0 / w.abs().max())
    masks = torch.cat([torch.ones(1, n), (torch.rand(6, n, generator=gen(9)) < 0.5).float()])
    got = GramTail.of(w, 0).bound(masks)
    norm = torch.linalg.matrix_norm(w, 2)
    assert got.shape == (len(masks),)
    assert bool((got >= exact_masked_norm(w, torch.ones(len(masks), 5), masks)).all())
    assert bool((got <= norm * (1 + TIGHT)).all()) and bool((got >= norm).all())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_the_split_of_a_non_finite_weight_certifies_nothing(bad):
    """No bound (inf at every point, float64) and the documented fields of a rank-0 split:
    ``outer`` (n, K^2) = (n, 0), so the masked Grams are still one matrix product; a scalar,
    finite ``error``."""
    w = torch.randn(4, 3, generator=gen(10), dtype=torch.float64)
    w[1, 2] = bad
    tail = GramTail.of(w)
    keep = torch.ones(5, 3, dtype=torch.float64)
    got = tail.bound(keep)
    assert got.dtype == torch.float64 and got.shape == (5,)
    assert bool((got == float("inf")).all())
    assert tail.outer.shape == (3, 0) and tail.scale.shape == (0,)
    assert (keep @ tail.outer).shape == (5, 0)
    assert tail.error.shape == () and math.isfinite(float(tail.error)) and float(tail.error) >= 0
    assert tail.tail.shape == () and float(tail.tail) == float("inf")


# --- the masked bound of a layer --------------------------------------------------------------


def test_dense_masked_bound_is_the_smallest_of_frobenius_and_both_splits():
    """Here the Frobenius bound wins at sparse points (one row, one column: |w_ij|) and the
    splits at dense ones; the result is the pointwise minimum of the three."""
    w = torch.randn(8, 9, generator=gen(11), dtype=torch.float64)
    g = gen(12)
    rows = (torch.rand(10, 8, generator=g) < 0.8).double()
    cols = (torch.rand(10, 9, generator=g) < 0.8).double()
    rows[:3], cols[:3] = 0.0, 0.0
    rows[:3, 2], cols[:3, 5] = 1.0, 1.0
    tails = dense_gram_tails(w, 1)
    parts = torch.stack([dense_frobenius(w, rows, cols), tails[0].bound(cols),
                         tails[1].bound(rows)])
    assert bool((parts[0, :3] < parts[1:, :3].amin(0)).all())  # Frobenius is the smallest
    assert torch.equal(dense_masked_bound(w, rows, cols, tails), parts.amin(0))
    assert torch.equal(dense_masked_bound(w, rows, cols, None), parts[0])


def test_conv_masked_bound_selects_each_point_by_its_own_kept_fraction():
    """Masked bounds where a point keeps *at most* CONV_KEPT_FRACTION of its outputs or of its
    inputs (exactly a quarter included), inf at the other points, each point's fraction its
    own; where computed, the smaller of Frobenius and Schur."""
    g = gen(13)
    kernel = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    rows = torch.ones(4, 3, 4, 4, dtype=torch.float64)  # 48 outputs
    cols = torch.ones(4, 2, 4, 4, dtype=torch.float64)  # 32 inputs
    rows[0] = 0.0
    rows[0].view(-1)[torch.randperm(48, generator=g)[:12]] = 1.0  # exactly 1/4 of the outputs
    cols[2] = 0.0
    cols[2].view(-1)[torch.randperm(32, generator=g)[:8]] = 1.0  # exactly 1/4 of the inputs
    rows[3].view(-1)[:5] = 0.0  # mostly kept: no masked bound
    assert CONV_KEPT_FRACTION == 0.25
    got = conv_masked_bound(kernel, (1, 1), (1, 1), rows, cols)
    assert got is not None and got.dtype == torch.float64 and got.shape == (4,)
    assert bool(torch.isinf(got[[1, 3]]).all())
    sparse = [0, 2]
    want = torch.minimum(conv_frobenius(kernel, 1, 1, rows[sparse], cols[sparse]),
                         conv_schur(kernel, 1, 1, rows[sparse], cols[sparse]))
    assert torch.equal(got[sparse], want)
    exact = exact_masked_norm(conv_matrix(kernel, 1, 1, (2, 4, 4)), rows.flatten(1),
                              cols.flatten(1))
    assert bool((got >= exact).all())
