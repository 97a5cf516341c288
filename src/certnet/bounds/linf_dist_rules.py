"""Bound rules of the l_p-dist layers (:mod:`certnet.nn.linf_dist`) and their companions.

For x in a box [lo, hi], ||x - w||_p is exactly bounded coordinate-wise (Zhang et al. 2021,
§3.3 at p = inf; any p by monotonicity of the norm in every |x_i - w_i|):
  lower = || max(lo - w, w - hi, 0) ||_p,   upper = || max(|lo - w|, |hi - w|) ||_p,
each term from one rounded subtraction of the endpoints. The layers have no linear relaxation
here (``relaxable = False``): backward passes end at their output interval.
"""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.rules import AffineRule, BoundRule, ChannelAffineRule, register_bound_rule
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
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


class LinfDistRule(BoundRule):
    relaxable = False

    def interval(self, m, inp):
        lower, upper = dist_interval(inp.lo, inp.hi, m.weight, m.p)
        if m.bias is not None:
            lower, upper = lower + m.bias, upper + m.bias
        return lower, upper


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


class MeanShiftRule(ChannelAffineRule):
    """z = h - mu: the running mean in eval mode, the clean batch's mean in training (the map
    the layer applies to that batch)."""

    def uses_clean(self, m):
        return m.training

    def scale_shift(self, m, inp):
        shift = -m.shift(inp.clean)
        return torch.ones_like(shift), shift


class NegateRule(AffineRule):
    nonexpansive = True

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


class TanhRule(BoundRule):
    """tanh is increasing: the interval is its endpoints' images. No linear relaxation here."""

    relaxable = False
    nonexpansive = True

    def interval(self, m, inp):
        return torch.tanh(inp.lo), torch.tanh(inp.hi)


register_bound_rule(LinfDist, LinfDistRule())
register_bound_rule(LinfDistConv2d, LinfDistConvRule())
register_bound_rule(MeanShift, MeanShiftRule())
register_bound_rule(Negate, NegateRule())
register_bound_rule(nn.Tanh, TanhRule())
