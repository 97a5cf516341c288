"""Bound rules of the l_p-dist layers (:mod:`certnet.nn.linf_dist`) and their companions.

For x in a box [lo, hi], ||x - w||_p is exactly bounded coordinate-wise (Zhang et al. 2021,
§3.3 at p = inf; any p by monotonicity of the norm in every |x_i - w_i|):
  lower = || max(lo - w, w - hi, 0) ||_p,   upper = || max(|lo - w|, |hi - w|) ||_p,
each term from one rounded subtraction of the endpoints. The layers have no linear relaxation
here (``relaxable = False``): backward passes end at their output interval.

Rounding (docs/rounding.md). Each difference x_i - w_i rounds by at most u of itself. At
p = inf the max and abs are exact, so an end (and the forward pass at any input of the box)
is within u (M + W_o) of its exact value, M the row's largest |x|, W_o = max_i |w_oi|. At
finite p (||t||_p = m (sum (t_i / m)^p)^(1/p), m = max t_i, in either grouping: the bounds
and the torch forward divide by m, the numba forward multiplies t_i sc by a rounded 1/(m sc),
sc an exact power of two that keeps m sc normal) every term's relative error e becomes
(1 + e)^p in the power and (1 + e) again after the root, so the result is within
eps_p = (2 (n + 4) / p + 32) u of itself (pow within 2 ulps, as glibc's, Sleef's and CUDA's are;
terms whose p-th power underflows lose under n 2^-1022 of a sum >= 1), plus the smallest
subnormal where the last product m s^(1/p) underflows (a subnormal m; its differences are
exact). Where top + error overflows (top >= every distance on the box) the last product may
overflow: the bound is infinite there (nothing certified).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.bounds.rules.affine import AffineRule, ChannelAffineRule
from certnet.bounds.rules.base import BoundRule
from certnet.floats import eta, unit_roundoff
from certnet.nn.linf_dist_kernels import linf_dist_interval

#: Elements of the (rows, outputs, inputs) difference tensor one chunk may hold.
CHUNK_ELEMENTS = 2 ** 22


def stable_pnorm(t: torch.Tensor, p: float) -> torch.Tensor:
    """||t||_p over the last dim of a non-negative ``t``, scaled by its max so large p neither
    overflows nor underflows."""
    if p == float("inf"):
        return t.amax(-1)
    top = t.amax(-1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    return ((t / safe).pow(p).sum(-1) ** (1 / p)) * top.squeeze(-1)


def dist_interval(lo: torch.Tensor, hi: torch.Tensor, weight: torch.Tensor, p: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds (rows, out) of ||x - w_o||_p over x in [lo, hi] (rows, in): at p = inf by the
    numba kernel where it applies, else in torch chunks that never hold the full
    rows x out x in tensor."""
    if p == float("inf"):
        fast = linf_dist_interval(lo, hi, weight)
        if fast is not None:
            return fast
    rows, n_in = lo.shape
    out = weight.shape[0]
    row_chunk = max(1, min(rows, CHUNK_ELEMENTS // max(1, n_in)))
    out_chunk = max(1, min(out, CHUNK_ELEMENTS // max(1, row_chunk * n_in)))
    lower, upper = lo.new_empty(rows, out), lo.new_empty(rows, out)
    for r in range(0, rows, row_chunk):
        lo_r, hi_r = lo[r:r + row_chunk, None, :], hi[r:r + row_chunk, None, :]
        for o in range(0, out, out_chunk):
            w = weight[None, o:o + out_chunk, :]
            below, above = lo_r - w, w - hi_r  # x - w >= below, w - x >= above
            lower[r:r + row_chunk, o:o + out_chunk] = stable_pnorm(
                torch.maximum(below, above).clamp_min(0), p)
            upper[r:r + row_chunk, o:o + out_chunk] = stable_pnorm(
                torch.maximum(below.abs(), above.abs()), p)
    return lower, upper


def dist_error(lo: torch.Tensor, hi: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """Per row and output, a bound on how far the computed distance bounds and the forward
    pass's distance at any input of the rows' boxes [lo, hi] are from their exact values
    (module docstring), bias additions included. Every distance is at most
    n^(1/p) (M + W_o), which sizes the relative errors."""
    u = unit_roundoff(lo.dtype)
    reach = torch.maximum(lo.abs(), hi.abs()).amax(1, keepdim=True) + m.weight.abs().amax(1)
    if math.isinf(m.p):
        error, top = 8 * u * reach, reach
    else:
        n = m.weight.shape[1]
        top = reach * n ** (1 / m.p) * (1 + 4 * u)
        error = 3 * (2 * (n + 4) / m.p + 32) * u * top
        error = torch.where((top + error).isfinite(), error, torch.inf)  # m s^(1/p) may overflow
    if m.bias is not None:
        error = error + 8 * u * (top + m.bias.abs())
    return error + 8 * eta(lo.dtype)  # divisions and powers that underflow


def dist_drift(error: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, m: nn.Module
               ) -> torch.Tensor:
    """|float - exact| of the distances (rows, out) given that of the inputs (rows, in):
    ||.||_p is n^(1/p)-Lipschitz in l_inf (1 at p = inf), plus the layer's own rounding."""
    n = m.weight.shape[1]
    stretch = 1.0 if math.isinf(m.p) else n ** (1 / m.p)
    spread = error.amax(1, keepdim=True) * stretch * (1 + 4 * unit_roundoff(error.dtype))
    return spread + dist_error(lo, hi, m)


class LinfDistRule(BoundRule):
    relaxable = False

    def interval(self, m, inp):
        lower, upper = dist_interval(inp.lo, inp.hi, m.weight, m.p)
        if m.bias is not None:
            lower, upper = lower + m.bias, upper + m.bias
        return lower, upper

    def interval_error(self, m, inp):
        return dist_error(inp.lo, inp.hi, m)

    def drift(self, m, error, inp):
        return dist_drift(error, inp.lo, inp.hi, m)


class LinfDistConvRule(BoundRule):
    """The fully-connected rule on every zero-padded input patch (the padding is a constant 0
    in both endpoints, as in the forward pass)."""

    relaxable = False

    def interval(self, m, inp):
        lower, upper = dist_interval(m.patches(inp.lo), m.patches(inp.hi), m.weight, m.p)
        lower, upper = m.fold(lower, inp.lo), m.fold(upper, inp.lo)
        if m.bias is not None:
            bias = m.bias.view(1, -1, 1, 1)
            lower, upper = lower + bias, upper + bias
        return lower, upper

    def interval_error(self, m, inp):
        return m.fold(dist_error(m.patches(inp.lo), m.patches(inp.hi), m), inp.lo)

    def drift(self, m, error, inp):
        return m.fold(dist_drift(m.patches(error.expand_as(inp.lo)), m.patches(inp.lo),
                                 m.patches(inp.hi), m),
                      inp.lo)


class MeanShiftRule(ChannelAffineRule):
    """z = h - mu: the running mean in eval mode, the clean batch's mean in training (the map
    the layer applies to that batch)."""

    def uses_batch_statistics(self, m):
        return m.training

    def scale_shift(self, m, inp):
        shift = -m.shift(inp.clean)
        return torch.ones_like(shift), shift


class NegateRule(AffineRule):
    nonexpansive = True
    exact_interval = True

    def interval(self, m, inp):
        return -inp.hi, -inp.lo

    def interval_error(self, m, inp):
        return 0.0

    def backward_error(self, m, inp):
        return 0.0

    def drift(self, m, error, inp):
        return error

    def row_norms(self, m, inp):
        return inp.lo.new_ones(())

    def linear(self, m, h, inp):
        return -h

    def linear_abs(self, m, r, inp):
        return r

    def transpose(self, m, lam, inp):
        return -lam

    def bias(self, m, inp):
        return None
