"""Guaranteed upper bounds on operator norms, in float64 (docs/architecture.md §3).

* :func:`dense_spectral_bound`: exact SVD (Gram iteration, Delattre et al. 2023, for huge
  matrices).
* :func:`conv_spectral_bound`: the circular-FFT bound (Sedghi et al. 2019) on the polyphase
  (space-to-depth) form of a convolution, which covers any stride and zero padding.
* :func:`magnitude_bound`: ||abs(A)||_2 by the Schur test, for the rounding analysis of
  :mod:`certnet.nn.rounding`.

Every bound is robust to under/overflow: it is computed on a rescaled copy, and a bound that is
not finite comes back as ``inf`` (which certifies nothing), never as 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: Relative slack added to every float64 bound to cover the rounding of the SVD / FFT itself.
BOUND_SLACK = 1e-9
#: Unit roundoff of float64 (round to nearest): |fl(a op b) - (a op b)| <= u |a op b|.
FLOAT64_UNIT_ROUNDOFF = 2.0**-53
#: Dense matrices with min(shape) above this use the Gram-iteration bound instead of an SVD.
EXACT_SVD_MAX_DIM = 4096


def _finite_or_inf(bound: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(bound), bound, torch.full_like(bound, float("inf")))


def _inf_for_non_finite_weights(bound: Callable[..., torch.Tensor]
                                ) -> Callable[..., torch.Tensor]:
    """Decorator: a weight with a NaN or infinite entry has the bound ``inf``."""
    @functools.wraps(bound)
    def wrapper(weight: torch.Tensor, *args: Any) -> torch.Tensor:
        if not torch.isfinite(weight).all():
            return torch.tensor(float("inf"), dtype=torch.float64, device=weight.device)
        return bound(weight, *args)
    return wrapper


def rescale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w / m`` and ``m = max |w|`` (1 for an all-zero ``w``), so norms neither under- nor
    overflow: the bound of ``w`` is ``m`` times the bound of ``w / m``."""
    m = w.abs().max()
    m = torch.where(m > 0, m, torch.ones_like(m))
    return w / m, m


@_inf_for_non_finite_weights
def gram_spectral_bound(matrix: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Upper bound on sigma_max(matrix) by Gram iteration (Delattre et al. 2023, Thm. 1).

    sigma_1(W) <= prod_t r_t^(2^-t) with r_0 = ||W||_F, H_{t+1} = H_t^T H_t / r_{t+1}, because
    sigma_1(H_t^T H_t) = sigma_1(H_t)^2 and sigma_1(H_T) <= ||H_T||_F = 1. Every H_t is
    rescaled by its largest entry first, so the Frobenius norms never under- or overflow.
    """
    h = matrix.detach().to(torch.float64)
    if h.shape[0] < h.shape[1]:
        h = h.T
    log_bound = torch.zeros((), dtype=torch.float64, device=h.device)
    for t in range(iterations + 1):
        h, m = rescale(h)
        r = torch.linalg.matrix_norm(h, "fro")
        if r == 0:  # an exactly zero matrix
            return torch.zeros((), dtype=torch.float64, device=h.device)
        log_bound = log_bound + (m.log() + r.log()) / 2**t
        h = h / r
        if t < iterations:
            h = h.T @ h
    return _finite_or_inf(log_bound.exp() * (1 + BOUND_SLACK))


@_inf_for_non_finite_weights
def dense_spectral_bound(matrix: torch.Tensor) -> torch.Tensor:
    """Sound upper bound on the spectral norm of a dense matrix, in float64."""
    w, m = rescale(matrix.detach().to(torch.float64))
    if min(w.shape) > EXACT_SVD_MAX_DIM:
        return _finite_or_inf(m * gram_spectral_bound(w))
    return _finite_or_inf(m * torch.linalg.matrix_norm(w, ord=2) * (1 + BOUND_SLACK))


@_inf_for_non_finite_weights
def conv_spectral_bound(
    weight: torch.Tensor, stride: int, padding: int, input_hw: tuple[int, int]
) -> torch.Tensor:
    """Sound upper bound on the l2 operator norm of ``F.conv2d(x, weight, stride, padding)`` on
    inputs of spatial size ``input_hw`` (zero padding).

    The zero-padded input is an isometric embedding of x; splitting it into its s*s polyphase
    components turns the stride-s correlation into a stride-1 correlation with c_in*s^2 channels
    and ceil(k/s) taps; every valid output of that is an output of the circular correlation on
    the polyphase grid, whose norm is max_f sigma_max(FFT(kernel)[f]) (Sedghi et al. 2019).
    """
    w, m = rescale(weight.detach().to(torch.float64))
    c_out, c_in, kh, kw = w.shape
    s = stride
    kh2, kw2 = -(-kh // s), -(-kw // s)
    w = F.pad(w, (0, kw2 * s - kw, 0, kh2 * s - kh))
    # w[o, c, p*s + a, q*s + b] -> w_poly[o, (c, a, b), p, q]
    w = w.reshape(c_out, c_in, kh2, s, kw2, s).permute(0, 1, 3, 5, 2, 4)
    w = w.reshape(c_out, c_in * s * s, kh2, kw2)
    n_h = -(-(input_hw[0] + 2 * padding) // s) + kh2
    n_w = -(-(input_hw[1] + 2 * padding) // s) + kw2
    spectrum = torch.fft.fft2(w, s=(n_h, n_w))  # (c_out, c_in s^2, n_h, n_w)
    spectrum = spectrum.permute(2, 3, 0, 1).reshape(n_h * n_w, c_out, c_in * s * s)
    return _finite_or_inf(m * torch.linalg.matrix_norm(spectrum, ord=2).max()
                          * (1 + BOUND_SLACK))


@_inf_for_non_finite_weights
def magnitude_bound(weight: torch.Tensor) -> torch.Tensor:
    """Upper bound on ||abs(A)||_2 for the dense (out, in) or convolution (out, in, kh, kw)
    operator A with this weight, by the Schur test ||B||_2 <= sqrt(||B||_1 ||B||_inf).

    A row of abs(A) sums to at most the sum of one output channel's kernel; a column to at
    most the sum of one input channel's kernels over all taps (each tap reaches a given input
    at most once per output channel), for any stride and zero padding."""
    w, m = rescale(weight.detach().to(torch.float64).abs())
    rows = w.flatten(1).sum(1).max()
    cols = w.transpose(0, 1).flatten(1).sum(1).max()
    return _finite_or_inf(m * (rows * cols).sqrt() * (1 + BOUND_SLACK))
