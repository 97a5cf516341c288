"""The bound rule of elementwise arithmetic with constants (:class:`certnet.nn.scale.Scale`):
z = a h + b per entry, the exact map of the computed z = fl(fl(h * w) + b) (a = w) or
z = fl(fl(h / w) + b) (a = 1 / w, never rounded: the quotient is taken as the layer takes it).

Rounding (docs/rounding.md; u, eta of the walk's dtype, at least float64's): per output,
M = max(|lo|, |hi|) of the same entry (the map is elementwise) and S = |a| M + |b|, above
|a h| + |b| for every h in the box. One product or quotient rounds by at most u |a h| + eta
(11u |a h| + eta for a product with a rounded reciprocal, torch's CUDA division by a CPU
scalar: :data:`certnet.nn.scale.ROUNDINGS`); the sum after it by u of its (rounded) value.
So fl(fl(h a) + b) is within 13u S + 2 eta of a h + b, for the interval's ends and for the
float64 forward pass of any h alike; S as computed (:meth:`ScaleRule.size`, three roundings,
one ulp up on 1 / |w|) is within (1 + 4u)(S_computed + eta) of it.

* ``interval``: the ends fl(fl(lo a) + b) and fl(fl(hi a) + b), ordered (a monotone map, and
  rounding is monotone: in float64 they hold the float forward outputs of every h in the box
  exactly); ``interval_error`` 32 (u S + eta): the ends' 13u S + 2 eta, the forward pass's
  13u S + 2 eta, and the widening's own rounding, u (S + error);
* ``backward``: lam_h = lam * w (lam / w), const = lam . b: each coefficient within u |lam a|
  (11u with a reciprocal), the constant an N-term dot (N = z's size) within gamma_{N+1}
  |lam| . |b|, so rho = gamma_{N+16} (S + eta) (underflow of the products is the engine's
  per-step charge);
* ``drift``: a float input h' within e of an exact h in the box gives fl(fl(h' a) + b) within
  |a| e (1 + 13u) + 13u S + 2 eta of a h + b: charged as |a| e (1 + 32u) + 32 (u S + eta).
"""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.rules.affine import AffineRule
from certnet.floats import eta, gamma, unit_roundoff
from certnet.nn.scale import check_scale


class ScaleRule(AffineRule):
    """z = a h + b elementwise (a diagonal affine map); equations in the module docstring."""

    keeps_boxes = True

    def check(self, m: nn.Module, where: str) -> None:
        check_scale(m, where)

    def fan_in(self, m):
        return 2  # one product (or quotient) and one sum per output

    def linear(self, m, h, inp):
        return m.scaled(h)

    def linear_abs(self, m, r, inp):
        return r * m.factor(r.dtype)

    def bias(self, m, inp):
        _, bias = m.operands(inp.lo)
        return bias

    def transpose(self, m, lam, inp):
        return m.scaled(lam)  # lam * w, or lam / w: w broadcasts over (S, *z) as over (B, *z)

    def row_norms(self, m, inp):
        return m.factor(inp.lo.dtype)

    def l2_lipschitz(self, m, inp):
        return m.factor(inp.lo.dtype).max()

    def size(self, m, inp):
        """S = |a| M + |b| per output (B, *z), M = max(|lo|, |hi|) of the same entry."""
        _, bias = m.operands(inp.lo)
        size = inp.magnitude * m.factor(inp.lo.dtype)
        return size if bias is None else size + bias.abs()

    def interval(self, m, inp):
        _, bias = m.operands(inp.lo)
        a, c = m.scaled(inp.lo), m.scaled(inp.hi)
        lo, hi = torch.minimum(a, c), torch.maximum(a, c)
        if bias is not None:
            lo, hi = lo + bias, hi + bias
        # an end that overflowed the wrong way (hi = -inf, lo = +inf) becomes the largest
        # finite float on its side: still a bound, and no inf - inf when widened
        top = torch.finfo(lo.dtype).max
        return lo.clamp(max=top), hi.clamp(min=-top)

    def interval_error(self, m, inp):
        dtype = inp.lo.dtype
        return 32 * (unit_roundoff(dtype) * self.size(m, inp) + eta(dtype))

    def backward_error(self, m, inp):
        dtype = inp.lo.dtype
        return gamma(inp.lo.shape[1:].numel() + 16, dtype) * (self.size(m, inp) + eta(dtype))

    def drift(self, m, error, inp):
        dtype = inp.lo.dtype
        u = unit_roundoff(dtype)
        spread = error * m.factor(dtype)
        return spread * (1 + 32 * u) + 32 * (u * self.size(m, inp) + eta(dtype))
