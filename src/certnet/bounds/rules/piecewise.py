"""Piecewise-linear rules beyond ReLU: LeakyReLU (CROWN's ReLU relaxation plus a linear part)
and 2-d max pooling (the relaxation of auto_LiRPA's BoundMaxPool; Xu et al. 2020, "Automatic
Perturbation Analysis for Scalable Certified Robustness and Beyond"), each with its rounding
bounded rigorously (docs/rounding.md)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.rules.base import BoundRule
from certnet.bounds.rules.relaxation import (
    per_row_dot,
    relaxation_error,
    relu_backward,
    relu_lines,
)
from certnet.errors import UnsupportedLayerError
from certnet.floats import eta, gamma


class LeakyReLURule(BoundRule):
    """f(h) = h for h > 0, a h otherwise, 0 <= a <= 1 (torch computes ``h * a``: one
    rounding). f = a h + (1 - a) relu(h), so a backward step is ReLU's (CROWN, Zhang et al.
    2018, §3.2) scaled by 1 - a plus a lam on h: on an unstable neuron the upper line through
    (l, a l) and (u, u), the lower slope a + (1 - a) s for ReLU's s in [0, 1] (every slope in
    [a, 1] is a sound lower line on the whole real line); alpha-CROWN optimises s
    (``slopes``, Xu et al. 2021, §3.1)."""

    activation = True
    nonexpansive = True  # |f(x) - f(y)| <= |x - y| for 0 <= a <= 1

    def check(self, m, where):
        a = m.negative_slope
        if not (isinstance(a, (int, float)) and 0 <= a <= 1):
            raise UnsupportedLayerError(f"{where}: LeakyReLU bounds need 0 <= negative_slope "
                                        f"<= 1, got {a!r}")

    def slopes(self, m, inp, slope):
        return relu_lines(inp, slope)[0]

    def unstable(self, m, lo, hi):
        return (lo < 0) & (hi > 0)

    def interval(self, m, inp):
        a = m.negative_slope
        return F.leaky_relu(inp.lo, a), F.leaky_relu(inp.hi, a)

    def interval_error(self, m, inp):
        """f is monotone and so is rounding: the float forward value of any h in [lo, hi]
        lies between the computed ends (float64 walks). An end rounds only where it is
        negative, by u a |lo| + eta (|hi| <= |lo| there); widened by err, an end that did not
        round stays outside (rounding is monotone), one that did needs err (1 - u) >= u a
        |lo| (2 + u) + eta (1 + u): gamma_4 a |lo| + 4 eta does, its own rounding included;
        gamma_2 a |lo| more (float64's u) covers the float64 forward pass when the walk
        runs in a lower precision. 0 for a = 0 (the products are exact zeros)."""
        a = m.negative_slope
        if a == 0:
            return 0.0
        dtype = inp.lo.dtype
        neg = (-inp.lo).clamp(min=0)
        error = (gamma(4, dtype) + gamma(2)) * a * neg + 4 * eta(dtype)
        return torch.where(inp.lo < 0, error, torch.zeros_like(error))

    def backward(self, m, lam, inp, slope):
        a = m.negative_slope
        coef, const = relu_backward(lam, inp.lo, inp.hi, slope, relu_lines(inp, slope))
        return lam * a + coef * (1 - a), const * (1 - a)

    def backward_error(self, m, inp):
        """lam . f(h) = a lam . h + (1 - a) lam . relu(h) exactly; ReLU's step (its charge,
        times 1 - a <= 1) bounds the second term. The rest rounds: 1 - a and a (cast to the
        dtype, 3u each), the products a lam and (1 - a) coef (|coef| <= (1 + 2u)|lam|: slopes
        in [0, 1]), their sum and (1 - a) const (|const| <= sum |lam_j| H_j): at most 14u
        sum_j |lam_j| H_j, within the second ReLU's worth of charge (32u H each)."""
        return relaxation_error(inp, inp.magnitude, 2)

    def drift(self, m, error, inp):
        """|fl(f(h')) - f(h)| <= |f(h') - f(h)| + |fl(f(h')) - f(h')| <= e + u a |h'| + eta,
        the last two only where h' <= 0 may happen (lo < e), and then |h'| <= max(0, -lo)
        + e; gamma_4 and the final factor pay for this formula's own rounding."""
        a = m.negative_slope
        dtype = inp.lo.dtype
        error = error.expand_as(inp.lo)
        extra = gamma(4, dtype) * a * ((-inp.lo).clamp(min=0) + error) + 2 * eta(dtype)
        moved = (error + extra) * (1 + gamma(2, dtype))
        return torch.where(inp.lo >= error, error, moved)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _geometry(m: nn.MaxPool2d) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation), each a pair."""
    kernel = _pair(m.kernel_size)
    stride = _pair(m.stride) if m.stride else kernel
    return kernel, stride, _pair(m.padding), _pair(m.dilation)


def _overlap(kernel: int, stride: int, dilation: int) -> int:
    """The most windows (along one axis) that contain one input: the offsets i in [0, k)
    with i d = x mod s form a progression of step s / gcd(s, d)."""
    return min(kernel, -(-kernel * math.gcd(stride, dilation) // stride))


class MaxPoolRule(BoundRule):
    """z_o = max of the inputs in window o (torch pads with -inf: the max over the window's
    inputs inside the map). The interval is the pooling of its ends (comparisons: exact).
    Backward (auto_LiRPA's BoundMaxPool): with j* the window's input of largest lower bound,
    z_o >= h_j* on the whole box, and where l_j* >= u_j for every other j of the window,
    z_o = h_j* there; elsewhere z_o <= max_j u_j (a constant). So lam_o >= 0, or a dominated
    window, puts lam_o on h_j*, and lam_o < 0 on an undominated window adds lam_o max_j u_j to
    the constant. Windows that overlap (stride < kernel) sum their coefficients onto a shared
    input (charged in ``backward_error``). No slopes to optimise."""

    activation = True
    exact_interval = True  # comparisons only; the float forward pass is the same max

    def check(self, m, where):
        if m.return_indices or m.ceil_mode:
            raise UnsupportedLayerError(f"{where}: MaxPool2d bounds need return_indices=False "
                                        "and ceil_mode=False")
        kernel, _, padding, dilation = _geometry(m)
        if any(2 * p > d * (k - 1) + 1 for k, p, d in zip(kernel, padding, dilation,
                                                           strict=True)):
            raise UnsupportedLayerError(f"{where}: MaxPool2d padding {padding} over half the "
                                        f"kernel {kernel}")

    def l2_lipschitz(self, m, inp):
        """|max_o(x) - max_o(y)|^2 <= sum over the window of (x_j - y_j)^2, and each input
        is in at most r windows: sqrt(r), rounded up."""
        kernel, stride, _, dilation = _geometry(m)
        r = math.prod(_overlap(*t) for t in zip(kernel, stride, dilation, strict=True))
        return 1.0 if r == 1 else math.nextafter(math.sqrt(r), math.inf)

    @staticmethod
    def _pool(m: nn.MaxPool2d, t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)

    def _unfold(self, m: nn.MaxPool2d, t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, k k, L): every window's inputs (padding as 0)."""
        kernel, stride, padding, dilation = _geometry(m)
        b, c, h, w = t.shape
        cols = F.unfold(t.reshape(b * c, 1, h, w), kernel, dilation, padding, stride)
        return cols.view(b, c, *cols.shape[1:])

    def _fold(self, m: nn.MaxPool2d, cols: torch.Tensor, size: tuple[int, int]
              ) -> torch.Tensor:
        """(..., k k, L) -> (..., H, W): each window entry summed onto its input."""
        kernel, stride, padding, dilation = _geometry(m)
        lead = cols.shape[:-2]
        out = F.fold(cols.reshape(-1, *cols.shape[-2:]), size, kernel, dilation, padding,
                     stride)
        return out.view(*lead, *size)

    def _windows(self, m: nn.MaxPool2d, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """j* (B, C, 1, L): the input of each window with the largest lower bound (one inside
        the map); dominated (B, C, 1, L): l_j* >= u_j for every other input j of the window."""
        if lo.dim() != 4:
            raise UnsupportedLayerError(f"MaxPool2d bounds need (batch, C, H, W) inputs, got "
                                        f"{tuple(lo.shape)}")
        valid = self._unfold(m, torch.ones_like(lo[:1, :1])) > 0  # (1, 1, kk, L)
        lo_c, hi_c = self._unfold(m, lo), self._unfold(m, hi)
        floor = torch.finfo(lo.dtype).max
        key = torch.where(valid, lo_c.clamp(min=-floor), -torch.inf)  # never a pad
        best = key.argmax(2, keepdim=True)
        top_lo = lo_c.gather(2, best)
        index = torch.arange(lo_c.shape[2], device=lo.device).view(1, 1, -1, 1)
        others = torch.where(valid & (index != best), hi_c, -torch.inf).amax(2, keepdim=True)
        return best, others <= top_lo

    def unstable(self, m, lo, hi):
        """The inputs of the windows not dominated by one input."""
        _, dominated = self._windows(m, lo, hi)
        cols = (~dominated).to(lo.dtype).expand(-1, -1, math.prod(_geometry(m)[0]), -1)
        return self._fold(m, cols, tuple(lo.shape[2:])) > 0

    def interval(self, m, inp):
        return self._pool(m, inp.lo), self._pool(m, inp.hi)

    def backward(self, m, lam, inp, slope):
        best, dominated = self._windows(m, inp.lo, inp.hi)
        batch, rows = lam.shape[:2]
        flat = lam.reshape(batch, rows, *best.shape[1:2], 1, -1)  # (B, S, C, 1, L)
        best, dominated = best.unsqueeze(1), dominated.unsqueeze(1)
        coef = torch.where((flat >= 0) | dominated, flat, torch.zeros_like(flat))
        top = self._pool(m, inp.hi).reshape(batch, 1, *dominated.shape[2:])
        const = per_row_dot(flat.clamp(max=0),
                            torch.where(dominated, torch.zeros_like(top), top))
        cols = flat.new_zeros(*flat.shape[:3], math.prod(_geometry(m)[0]), flat.shape[-1])
        cols = cols.scatter(3, best.expand(-1, rows, -1, -1, -1), coef)
        return self._fold(m, cols, tuple(inp.lo.shape[2:])), const

    def backward_error(self, m, inp):
        """The coefficients are lam's own entries (selected, exact); the constant is an
        N-term dot of lam- with window maxima below H_o, the window's largest |h|
        (gamma_N), and an input shared by r <= k^2 overlapping windows sums at most r of them,
        each at most |lam_o| (gamma_r of |lam_o| H_o): gamma_{N + k^2 + 4} H_o, the
        extra terms paying for this bound's own rounding; what the products lose to underflow
        the pass charges whatever lam (:class:`certnet.bounds.crown.Rounding`)."""
        top = self._pool(m, inp.magnitude)
        kernel = _geometry(m)[0]
        return gamma(top[0].numel() + kernel[0] * kernel[1] + 4, inp.lo.dtype) * top + \
            2 * eta(inp.lo.dtype)

    def drift(self, m, error, inp):
        # |max(a') - max(a)| <= max_j |a'_j - a_j|, and the max itself is exact
        return self._pool(m, error.expand_as(inp.lo))


__all__ = ["LeakyReLURule", "MaxPoolRule"]
