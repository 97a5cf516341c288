"""Activation rules: ReLU, MinMax and their clipped forms, each relaxed with CROWN's ReLU lines
(:mod:`certnet.bounds.rules.relaxation`)."""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.rules.base import BoundRule
from certnet.bounds.rules.relaxation import (
    pairs_max,
    per_row_dot,
    relaxation_error,
    relu_backward,
    relu_lines,
)
from certnet.nn import branchless


class ReLURule(BoundRule):
    activation = True
    nonexpansive = True
    exact_interval = True
    patches = "relu"

    def slopes(self, m, inp, slope):
        return relu_lines(inp, slope)[0]

    def unstable(self, m, lo, hi):
        return (lo < 0) & (hi > 0)

    def jacobian_masks(self, m, lo, hi):
        keep = hi > 0  # off on the whole box: constant 0
        return keep, keep

    def constancy_gap(self, m, lo, hi):
        return hi.clamp(min=0) * (lo < 0)  # pushes unstable neurons off; active ones stay

    def interval(self, m, inp):
        return torch.relu(inp.lo), torch.relu(inp.hi)

    def backward(self, m, lam, inp, slope):
        return relu_backward(lam, inp.lo, inp.hi, slope, relu_lines(inp, slope))

    def backward_error(self, m, inp):
        return relaxation_error(inp, inp.magnitude, 1)

    def drift(self, m, error, inp):
        # |relu(a) - relu(b)| <= |a - b|, and relu itself is exact. Where hi <= -error, both
        # inputs are <= 0 (one lies in the interval, the other within error of it; the
        # comparison is exact), so both outputs are exactly 0
        return torch.where(inp.hi <= -error, 0.0, error)


class MinMaxRule(BoundRule):
    """MinMax on channel pairs (a, b): min = a - relu(a - b), max = b + relu(a - b), with
    relu(a - b) relaxed on the interval [lo_a - hi_b, hi_a - lo_b]. Both outputs are
    monotone in both inputs, so the interval is the map applied to the endpoints."""

    activation = True
    nonexpansive = True
    exact_interval = True

    def unstable(self, m, lo, hi):
        half = lo.shape[1] // 2
        pair = (lo[:, :half] - hi[:, half:] < 0) & (hi[:, :half] - lo[:, half:] > 0)
        return torch.cat([pair, pair], dim=1)

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        half = inp.lo.shape[1] // 2
        lam_min, lam_max = lam[:, :, :half], lam[:, :, half:]
        lo_d = inp.lo[:, :half] - inp.hi[:, half:]
        hi_d = inp.hi[:, :half] - inp.lo[:, half:]
        lam_d, const = relu_backward(lam_max - lam_min, lo_d, hi_d, slope)
        return torch.cat([lam_min + lam_d, lam_max - lam_d], dim=2), const

    def backward_error(self, m, inp):
        """relu(a - b) with |a - b| <= 2 H of the pair, its coefficient lam_max - lam_min
        (at most |lam_min| + |lam_max|, rounded) and the two output sums: twice one ReLU's."""
        return relaxation_error(inp, 2 * pairs_max(inp.magnitude), 2)

    def drift(self, m, error, inp):
        return pairs_max(error)  # min and max are 1-Lipschitz in the pair's l_inf norm


class ClippedReLURule(BoundRule):
    """clamp(h, 0, t) = relu(h) - relu(h - t+) with t+ = max(t, 0) (the layer's function for
    every t): both ReLUs relaxed on their own intervals (CROWN's ReLU bounds, summed)."""

    activation = True
    nonexpansive = True
    exact_interval = True

    def unstable(self, m, lo, hi):
        t = m.threshold.clamp(min=0)
        return ((lo < 0) & (hi > 0)) | ((lo < t) & (hi > t))

    def jacobian_masks(self, m, lo, hi):
        keep = (hi > 0) & (lo < m.threshold.clamp(min=0))  # else constant 0 or t
        return keep, keep

    def constancy_gap(self, m, lo, hi):
        return branchless.minimum(branchless.clamp(hi, min=0),
                                  branchless.clamp(m.threshold - lo, min=0))

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        t = m.threshold.clamp(min=0)
        first, const = relu_backward(lam, inp.lo, inp.hi, slope)
        second, const2 = relu_backward(-lam, inp.lo - t, inp.hi - t, slope)
        return first + second, const + const2 - per_row_dot(second, t.expand_as(inp.lo[:1])
                                                              .unsqueeze(1))

    def backward_error(self, m, inp):
        """Two relaxations, of h and of h - t (both within H + t), and the dot with t."""
        reach = inp.magnitude + m.threshold.clamp(min=0).abs()
        return relaxation_error(inp, reach, 3)

    def drift(self, m, error, inp):
        return error


class ClippedMinMaxRule(BoundRule):
    """Pairs (a, b) -> (max(min(a, b), L), min(max(a, b), U)), written with three ReLUs:
    min(a, b) = a - r, max(a, b) = b + r, r = relu(a - b); the clipped min is
    L + relu(min - L) and the clipped max U - relu(U - max). Each ReLU is relaxed on the interval
    its argument provably lies in; the two uses of r are merged into one relaxation."""

    activation = True
    nonexpansive = True
    exact_interval = True

    @staticmethod
    def _parts(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor):
        half = lo.shape[1] // 2
        lo_a, lo_b, hi_a, hi_b = lo[:, :half], lo[:, half:], hi[:, :half], hi[:, half:]
        low_min = branchless.minimum(lo_a, lo_b) - m.lower  # min(a, b) - L
        high_min = branchless.minimum(hi_a, hi_b) - m.lower
        low_max = m.upper - branchless.maximum(hi_a, hi_b)  # U - max(a, b)
        high_max = m.upper - branchless.maximum(lo_a, lo_b)
        return (lo_a - hi_b, hi_a - lo_b), (low_min, high_min), (low_max, high_max)

    def unstable(self, m, lo, hi):
        pair = torch.zeros_like(lo[:, :lo.shape[1] // 2], dtype=torch.bool)
        for low, high in self._parts(m, lo, hi):
            pair = pair | ((low < 0) & (high > 0))
        return torch.cat([pair, pair], dim=1)

    def jacobian_masks(self, m, lo, hi):
        # the clipped min is constant where min(a, b) <= L on the whole box, the clipped max
        # where max(a, b) >= U; each output copies one input of its pair, so a pair's inputs
        # drop out only when both of its outputs are constant
        _, (_, high_min), (_, high_max) = self._parts(m, lo, hi)
        keep_min, keep_max = high_min > 0, high_max > 0
        pair = keep_min | keep_max
        return torch.cat([pair, pair], dim=1), torch.cat([keep_min, keep_max], dim=1)

    def constancy_gap(self, m, lo, hi):
        _, (_, high_min), (_, high_max) = self._parts(m, lo, hi)
        return torch.cat([branchless.clamp(high_min, min=0), branchless.clamp(high_max, min=0)],
                         dim=1)

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        half = inp.lo.shape[1] // 2
        lam_min, lam_max = lam[:, :, :half], lam[:, :, half:]
        diff, low, high = self._parts(m, inp.lo, inp.hi)
        # lam_min (L + relu(min - L)) >= c_min (min - L) + k + lam_min L
        c_min, const = relu_backward(lam_min, *low, slope)
        # lam_max (U - relu(U - max)) >= lam_max U + c_max (U - max) + k
        c_max, k = relu_backward(-lam_max, *high, slope)
        const = const + k + per_row_dot(lam_min - c_min, m.lower.unsqueeze(0).unsqueeze(1)) + \
            per_row_dot(lam_max + c_max, m.upper.unsqueeze(0).unsqueeze(1))
        # c_min min - c_max max = c_min a - c_max b - (c_min + c_max) r
        c_r, k = relu_backward(-(c_min + c_max), *diff, slope)
        return torch.cat([c_min + c_r, -c_max - c_r], dim=2), const + k

    def backward_error(self, m, inp):
        """Three relaxations (of a - b, min - L and U - max, each within 2 H + |L| + |U|),
        the dots with L and U and the sums of the coefficients: 6 ReLUs' worth."""
        bounds = torch.cat([m.lower.abs() + m.upper.abs()] * 2, dim=0)
        return relaxation_error(inp, 2 * pairs_max(inp.magnitude) + bounds, 6)

    def drift(self, m, error, inp):
        return pairs_max(error)
