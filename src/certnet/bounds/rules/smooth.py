"""Sound linear relaxations of smooth activations: sigmoid, tanh, erf, GELU and SiLU
(issue 27).

Per neuron, on its input interval [l, u], a lower line through (l, f(l)) and an upper line
through (u, f(u)), each with the steepest slope the function's shape allows:

* on a piece where f is convex: the lower line is the tangent at l, the upper the chord;
* where f is concave: the lower line is the chord, the upper the tangent at u;
* always (and alone across an inflection): the least slope of f on [l, u], by the mean value
  theorem f(x) - f(l) >= (min f') (x - l) and f(u) - f(x) >= (min f') (u - x).

These are CROWN's tangent and chord lines (Zhang et al. 2018, §3.2 and Table 1) anchored at the
interval's ends, where each is sound by the convexity or the mean-value argument alone, so the
floating-point lines only need their anchors and slopes rounded the safe way (below).

Rounding: certnet evaluates f with torch, whose implementations (Sleef, glibc, CUDA's libm) are
within a few ulps; every bound here charges 16 ulps of the function's size (:attr:`Smooth.size`)
plus 4 smallest normals for underflow, as the l_inf-dist head's tanh always did, and 64 u for
each computed derivative (a product or sum of two such values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from certnet.bounds.rules.base import BoundRule, LayerInput
from certnet.bounds.rules.relaxation import per_row_dot
from certnet.errors import UnsupportedLayerError
from certnet.floats import gamma, outward, unit_roundoff

Tensor = torch.Tensor
#: a float window [a, b] holding an exact point, and a float below f (or f') there
Window = tuple[float, float]
Minimum = tuple[float, float, float]


@dataclass(frozen=True)
class Smooth:
    """What the relaxation needs of a smooth f with no interior maximum.

    ``derivative``: f' (in torch); ``lipschitz``: a float >= sup |f'|; ``size(m)``: a bound of
    the magnitude torch's f is accurate relative to, for |x| <= m (>= |f(x)|, and >= |x| where
    f is computed from a product with x); ``range``: floats below inf f and above sup f;
    ``inflections``: windows holding the points where the curvature changes, the leftmost
    piece convex if ``convex_first``; ``value_minima`` and ``slope_minima``: the interior local
    minima of f and of f' (window, a float below the minimum's value)."""

    derivative: Callable[[Tensor], Tensor]
    lipschitz: float
    size: Callable[[Tensor], Tensor]
    range: tuple[float, float]
    inflections: tuple[Window, ...]
    convex_first: bool
    value_minima: tuple[Minimum, ...] = ()
    slope_minima: tuple[Minimum, ...] = ()


_SQRT_2PI = math.sqrt(2 * math.pi)
SIGMOID = Smooth(lambda x: torch.sigmoid(x) * torch.sigmoid(-x), 0.25,
                 lambda m: torch.ones_like(m), (0.0, 1.0), ((0.0, 0.0),), convex_first=True)
TANH = Smooth(lambda x: 1 - torch.tanh(x) ** 2, 1.0, lambda m: m.clamp(max=1.0), (-1.0, 1.0),
              ((0.0, 0.0),), convex_first=True)
#: |erf(x)| <= 2 |x| / sqrt(pi) < 1.2 |x|, and <= 1
ERF = Smooth(lambda x: 2 / math.sqrt(math.pi) * torch.exp(-x * x), 1.1284,
             lambda m: (1.2 * m).clamp(max=1.0), (-1.0, 1.0), ((0.0, 0.0),), convex_first=True)
#: GELU(x) = x Phi(x): f' = Phi(x) + x phi(x) (at most 1.1290, at sqrt 2), f'' = phi(x) (2 - x^2);
#: f's minimum -0.169971 at x = -0.751792, f''s minimum -0.128904 at x = -sqrt 2 (the values
#: are checked in high precision by tests/test_smooth_activations.py); |GELU(x)| <= |x|
GELU = Smooth(lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2)
              / _SQRT_2PI, 1.13, lambda m: 2 * m, (-0.17, math.inf),
              ((-1.41422, -1.41421), (1.41421, 1.41422)), convex_first=False,
              value_minima=((-0.7518, -0.7517, -0.1700),),
              slope_minima=((-1.41422, -1.41421, -0.1290),))

#: SiLU(x) = x sigmoid(x) = x s: f' = s (1 + x (1 - s)) (1 - s computed as sigmoid(-x); at
#: most 1.09984, at 2.39936), f'' = s (1 - s) (2 + x (1 - 2 s)); f's minimum -0.278465 at
#: x = -1.278465, f''s minimum -0.099839 at x = -2.399357 (checked like GELU's);
#: |SiLU(x)| <= |x|
SILU = Smooth(lambda x: torch.sigmoid(x) * (1 + x * torch.sigmoid(-x)), 1.1,
              lambda m: 2 * m, (-0.2785, math.inf),
              ((-2.39936, -2.39935), (2.39935, 2.39936)), convex_first=False,
              value_minima=((-1.2785, -1.2784, -0.2785),),
              slope_minima=((-2.39936, -2.39935, -0.0999),))


def _meets(lo: Tensor, hi: Tensor, window: Window) -> Tensor:
    """Whether [lo, hi] may hold the point in ``window``."""
    return (lo <= window[1]) & (hi >= window[0])


class SmoothRule(BoundRule):
    """The rule of one smooth activation (its :class:`Smooth` ``fn``): interval from the
    endpoints and interior minima, tangent / chord / mean-value lines for CROWN."""

    activation = True
    fn: Smooth

    def l2_lipschitz(self, m, inp):
        return self.fn.lipschitz

    def unstable(self, m, lo, hi):
        return hi > lo  # every line depends on its interval: tighter bounds always help

    def error(self, magnitude: Tensor) -> Tensor:
        """A bound of |torch's f(x) - f(x)| for |x| <= ``magnitude``."""
        info = torch.finfo(magnitude.dtype)
        return 16 * unit_roundoff(magnitude.dtype) * self.fn.size(magnitude) + \
            4 * info.smallest_normal

    def interval(self, m, inp):
        f_lo, f_hi = m(inp.lo), m(inp.hi)
        low, high = torch.minimum(f_lo, f_hi), torch.maximum(f_lo, f_hi)  # no interior max
        for a, b, value in self.fn.value_minima:
            low = torch.where(_meets(inp.lo, inp.hi, (a, b)), low.clamp(max=value), low)
        bottom, top = self.fn.range  # also where f was NaN at an infinite end
        return low.nan_to_num(nan=bottom).clamp(min=bottom), \
            high.nan_to_num(nan=top).clamp(max=top)

    def interval_error(self, m, inp):
        return 2 * self.error(inp.magnitude)

    def drift(self, m, error, inp):
        return self.fn.lipschitz * error + self.error(inp.magnitude + error)

    def _enclose(self, m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Floats below and above the exact f at each x."""
        value = m(x)
        err = self.error(x.abs())
        return outward(value - err, value + err)

    def lines(self, m: nn.Module, inp: LayerInput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(s, b, t, c) with s x + b <= f(x) <= t x + c exactly for every x in [lo, hi]."""
        lo, hi, fn = inp.lo, inp.hi, self.fn
        u, tiny = unit_roundoff(lo.dtype), torch.finfo(lo.dtype).smallest_normal
        (fl, fl_up), (fu_down, fu) = self._enclose(m, lo), self._enclose(m, hi)
        slack = 64 * u * max(1.0, fn.lipschitz) + 4 * tiny
        tangent_lo, tangent_hi = fn.derivative(lo) - slack, fn.derivative(hi) - slack
        least = torch.minimum(tangent_lo, tangent_hi)
        for a, b, value in fn.slope_minima:
            least = torch.where(_meets(lo, hi, (a, b)), least.clamp(max=value), least)
        # the chord's slope, rounded down: (fu_down - fl_up) / (hi - lo) rounds 3 times
        # (a width of 0 gives -inf or NaN: the moved-out ends cross; dropped as not finite)
        chord = (fu_down - fl_up) / (hi - lo)
        chord = chord - 6 * u * chord.abs() - 4 * tiny
        none = torch.full_like(lo, -math.inf)
        chord = torch.where(chord.isfinite(), chord, none)
        convex, concave = self._curvature(lo, hi)
        s = torch.maximum(least, torch.where(convex, tangent_lo, torch.where(concave, chord, none)))
        t = torch.maximum(least, torch.where(convex, chord, torch.where(concave, tangent_hi, none)))
        # anchors: b = fl - s lo rounded down, c = fu - t hi rounded up (3 roundings each)
        b, c = fl - s * lo, fu - t * hi
        b = b - gamma(4, lo.dtype) * ((s * lo).abs() + fl.abs()) - 2 * tiny
        c = c + gamma(4, lo.dtype) * ((t * hi).abs() + fu.abs()) + 2 * tiny
        # an end or a slope that is not finite makes b or c so (inf * 0 is NaN): there, the
        # interval's ends as flat lines
        low, high = self.interval(m, inp)
        err = self.interval_error(m, inp)
        low, high = outward(low - err, high + err)
        fine = b.isfinite() & c.isfinite()
        big = torch.finfo(lo.dtype).max
        zero = torch.zeros_like(lo)
        return (torch.where(fine, s, zero), torch.where(fine, b, low.clamp(min=-big)),
                torch.where(fine, t, zero), torch.where(fine, c, high.clamp(max=big)))

    def _curvature(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Masks: [lo, hi] within one piece where f is convex, within one where it is
        concave."""
        ends = [-math.inf, *[x for w in self.fn.inflections for x in w], math.inf]
        convex, concave = torch.zeros_like(lo, dtype=torch.bool), \
            torch.zeros_like(lo, dtype=torch.bool)
        for k in range(len(self.fn.inflections) + 1):
            inside = (lo >= ends[2 * k]) & (hi <= ends[2 * k + 1])
            if (k % 2 == 0) == self.fn.convex_first:
                convex = convex | inside
            else:
                concave = concave | inside
        return convex, concave

    def backward(self, m, lam, inp, slope):
        s, b, t, c = (v.unsqueeze(1) for v in self.lines(m, inp))
        pos, neg = lam.clamp(min=0), lam.clamp(max=0)
        return pos * s + neg * t, per_row_dot(pos, b) + per_row_dot(neg, c)

    def backward_error(self, m, inp):
        """The coefficient lam+ s (or lam- t: one is 0) rounds once, off by u |lam| |s|,
        which h (|h| <= its magnitude) turns into u |lam| |s| |h|; the constant is two
        N-term dots and their sum: gamma_{N+1} |lam| max(|b|, |c|) (Higham §3.1)."""
        s, b, t, c = self.lines(m, inp)
        n = inp.lo.shape[1:].numel()
        dtype = inp.lo.dtype
        return gamma(2, dtype) * torch.maximum(s.abs(), t.abs()) * inp.magnitude + \
            gamma(n + 3, dtype) * torch.maximum(b.abs(), c.abs())


class SigmoidRule(SmoothRule):
    fn = SIGMOID


class TanhRule(SmoothRule):
    fn = TANH


class ErfRule(SmoothRule):
    fn = ERF


class SiLURule(SmoothRule):
    fn = SILU


class GELURule(SmoothRule):
    fn = GELU

    def check(self, m, where):
        if m.approximate != "none":
            raise UnsupportedLayerError(f"{where}: GELU(approximate={m.approximate!r}) is not "
                                        "bounded; only the exact form x Phi(x)")
