"""Guaranteed upper bounds, per point, on the spectral norm of a layer's weight with rows and
columns removed: ||diag(r) A diag(c)||_2 for 0/1 keep masks r (outputs) and c (inputs).

These are the local Lipschitz bounds of Huang et al. 2021 ("Training Certifiably Robust Neural
Networks with Efficient Local Lipschitz Bounds", Eq. 7), which the reference computes by power
iteration, an estimate from *below*. Here every bound is an upper bound in float64 with its
rounding covered, so certificates may rely on it; the local bound of a layer is the minimum of
the ones below and of the layer's global bound (:mod:`certnet.nn.spectral`).

* :func:`dense_frobenius` / :func:`conv_frobenius`: ||A_RS||_2 <= ||A_RS||_F, exact in
  r^T (A o A) c; tight when few rows and columns are kept.
* :func:`conv_schur`: the Schur test on |A_RS| (max row sum times max column sum, both
  convolutions of the masks).
* :class:`GramTail`: for a dense W, ||W_RS||^2 <= lambda_max(G_SS) with G = W^T W (or
  ||W_RS||^2 <= lambda_max(H_RR), H = W W^T). G splits once per model into a rank-K part
  P = V D V^T (D >= 0) and a rest Q whose norm is bounded soundly; by Weyl and Cauchy interlacing
  lambda_max(G_SS) <= lambda_max(D^1/2 V_S^T V_S D^1/2) + ||Q||_2, a K x K eigenproblem per
  point. With K the full size it is the exact norm of the column-masked weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.nn.spectral import BOUND_SLACK, FLOAT64_UNIT_ROUNDOFF, rescale

#: Default rank K of the Gram split.
GRAM_RANK = 32


def _gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): relative error of an n-term float64 sum of products."""
    nu = n * FLOAT64_UNIT_ROUNDOFF
    return nu / (1 - nu)


def _sqrt_up(value: torch.Tensor) -> torch.Tensor:
    """sqrt of a float64 upper bound, rounded up (and 0 for values <= 0)."""
    return value.clamp_min(0).sqrt() * (1 + BOUND_SLACK)


def dense_frobenius(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                    ) -> torch.Tensor:
    """||diag(r) W diag(c)||_F per point: sqrt(r^T (W o W) c); ``rows`` (B, out), ``cols``
    (B, in)."""
    w, m = rescale(weight.detach().double())
    w2 = w.square()
    total = ((rows.double() @ w2) * cols.double()).sum(1)
    return _sqrt_up(total * (1 + _gamma(w2.shape[0] + w2.shape[1] + 1))) * m


def _conv(x: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    with gemm_convolutions():  # no FFT/Winograd: rounding stays bounded
        return F.conv2d(x, kernel, None, stride, padding)


def _conv_transpose(y: torch.Tensor, kernel: torch.Tensor, stride: int, padding: int,
                    input_shape: torch.Size) -> torch.Tensor:
    with gemm_convolutions():
        return torch.nn.grad.conv2d_input(input_shape, kernel, y, stride, padding)


def conv_frobenius(weight: torch.Tensor, stride: int, padding: int, rows: torch.Tensor,
                   cols: torch.Tensor) -> torch.Tensor:
    """||diag(r) A diag(c)||_F per point for the convolution A with this weight: the sum over
    kept outputs of the squared weights that reach kept inputs, one convolution of ``cols``
    (B, C_in, H, W) with W o W, weighted by ``rows`` (B, C_out, H', W')."""
    w, m = rescale(weight.detach().double())
    w2 = w.square()
    total = (_conv(cols.double(), w2, stride, padding) * rows.double()).flatten(1).sum(1)
    fan = w2[0].numel() + rows[0].numel()
    return _sqrt_up(total * (1 + _gamma(fan + 1))) * m


def conv_schur(weight: torch.Tensor, stride: int, padding: int, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
    """Schur test ||B||_2 <= sqrt(||B||_1 ||B||_inf) on B = |diag(r) A diag(c)| per point:
    row sums are a convolution of ``cols`` with |W|, column sums a transposed convolution of
    ``rows``."""
    w, m = rescale(weight.detach().double().abs())
    r, c = rows.double(), cols.double()
    row_sums = (_conv(c, w, stride, padding) * r).flatten(1).amax(1)
    col_sums = (_conv_transpose(r, w, stride, padding, c.shape) * c).flatten(1).amax(1)
    slack = 1 + _gamma(w[0].numel() + w[:, 0].numel() + 1)
    return _sqrt_up(row_sums * col_sums * slack**2) * m


def _symmetric_norm_bound(matrix: torch.Tensor) -> torch.Tensor:
    """Sound bound on ||S||_2 of a symmetric float64 matrix (eigvalsh is backward stable:
    its error is a modest multiple of n u ||S||, far below the slack)."""
    if matrix.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=matrix.device)
    return torch.linalg.eigvalsh(matrix).abs().max() * (1 + BOUND_SLACK)


@dataclass
class GramTail:
    """G = A^T A (A: ``factor``, rows summed over) split as V diag(d) V^T + Q with d >= 0 and
    ||Q||_2 <= ``tail`` in exact arithmetic (the rounding of G, of V d V^T and of Q included).
    ``outer`` holds v_s v_s^T (row s of V) flattened, so the masked Grams of a batch are one
    matrix product; ``error`` bounds the rounding of that product and of the scaling."""

    outer: torch.Tensor
    scale: torch.Tensor
    tail: torch.Tensor
    error: torch.Tensor
    magnitude: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, factor: torch.Tensor, rank: int = GRAM_RANK) -> GramTail:
        a, magnitude = rescale(factor.detach().double())  # no under- or overflow in A^T A
        m, n = a.shape
        if not torch.isfinite(a).all():  # no bound: inf certifies nothing
            empty = a.new_zeros(n, 0)
            return cls(empty, a.new_zeros(0), a.new_tensor(float("inf")), a.new_zeros(()),
                       a.new_ones(()))
        k = min(rank, n)
        gram = a.T @ a
        values, vectors = torch.linalg.eigh(gram)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        floor = values[k].clamp_min(0) if k < n else values.new_zeros(())
        d = (values[:k] - floor).clamp_min(0)
        basis = vectors[:, :k]
        low_rank = (basis * d) @ basis.T
        rest = gram - low_rank
        # |G - fl(A^T A)| <= gamma_m |A|^T |A|; |fl(V d V^T) - V d V^T| <= gamma_k |V| d |V|^T;
        # |fl(G - P) - (G - P)| <= u |rest|: their Frobenius norms bound their spectral norms
        magnitudes = torch.stack([
            _gamma(m) * torch.linalg.matrix_norm(a.abs().T @ a.abs()),
            _gamma(k + 1) * torch.linalg.matrix_norm((basis.abs() * d) @ basis.abs().T),
            FLOAT64_UNIT_ROUNDOFF * torch.linalg.matrix_norm(rest)])
        tail = _symmetric_norm_bound(rest) + 2 * magnitudes.sum()
        root = d.sqrt()
        outer = (basis.unsqueeze(2) * basis.unsqueeze(1)).reshape(n, k * k)
        # rounding of Y = V^T diag(c) V (n-term sums) and of root Y root, entrywise at most
        # gamma_{n+2} root |V|^T |V| root for every mask: bound its Frobenius norm once
        error = _gamma(n + 2) * torch.linalg.matrix_norm(
            root[:, None] * (basis.abs().T @ basis.abs()) * root[None, :])
        return cls(outer, root, tail, 2 * error, magnitude)

    def bound(self, keep: torch.Tensor) -> torch.Tensor:
        """Per point, an upper bound on sqrt(lambda_max(G_SS)) = ||A diag(keep)||_2 for the
        0/1 masks ``keep`` (B, n)."""
        k = self.scale.numel()
        if k == 0:
            return _sqrt_up(self.tail.expand(len(keep))) * self.magnitude
        gram = (keep.double() @ self.outer).view(-1, k, k)
        gram = self.scale[:, None] * gram * self.scale[None, :]
        top = torch.linalg.eigvalsh(gram)[:, -1]
        return _sqrt_up((top + self.error) * (1 + BOUND_SLACK) + self.tail) * self.magnitude


def dense_gram_tails(weight: torch.Tensor, rank: int = GRAM_RANK
                     ) -> tuple[GramTail, GramTail]:
    """The Gram splits of a dense weight (out, in) for masked columns (G = W^T W) and masked
    rows (H = W W^T)."""
    return GramTail.of(weight, rank), GramTail.of(weight.T, rank)


#: Convolutions get masked bounds only at points keeping at most this fraction of their
#: inputs or outputs (elsewhere they cannot beat the spectral norm).
CONV_KEPT_FRACTION = 0.25


def dense_masked_bound(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       tails: tuple[GramTail, GramTail] | None) -> torch.Tensor:
    """The smallest of Frobenius and (given the Gram splits) both Gram-split bounds."""
    r, c = rows.flatten(1), cols.flatten(1)
    bounds = [dense_frobenius(weight, r, c)]
    if tails is not None:
        bounds += [tails[0].bound(c), tails[1].bound(r)]
    return torch.stack(bounds).amin(0)


def conv_masked_bound(kernel: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
                      rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """Frobenius and Schur beat a convolution's spectral norm only for very sparse masks: they
    are computed (two float64 convolutions each) only where few neurons are kept (inf
    elsewhere; None where nowhere). ``kernel`` must dominate the exact kernel entrywise."""
    kept = torch.minimum(rows.flatten(1).double().mean(1), cols.flatten(1).double().mean(1))
    sparse = (kept <= CONV_KEPT_FRACTION).nonzero().squeeze(1)
    if len(sparse) == 0:
        return None
    r, c = rows[sparse], cols[sparse]
    bound = torch.full((len(rows),), torch.inf, dtype=torch.float64, device=rows.device)
    bound[sparse] = torch.minimum(conv_frobenius(kernel, stride, padding, r, c),
                                  conv_schur(kernel, stride, padding, r, c))
    return bound
