"""The bound rule of constant padding (:mod:`certnet.nn.pad`): z = pad(h, c), the entries of
h copied (or cropped) and the new ones the constant c.

* interval: [pad(lo, c), pad(hi, c)], exact (c rounded outward where the walk's dtype does
  not hold it: c_lo <= c <= c_hi);
* backward: lam . z = crop(lam) . h + c * (sum of lam over the padded entries); the
  coefficients are copies (exact), the constant a sum of at most N = z's size terms and one
  product: |error| <= gamma_N |c| sum_pad |lam_j| <= sum_j |lam_j| rho with rho = gamma_{N+2}
  |c| (the two extra terms pay for rho's own evaluation); 0 when c = 0;
* drift: pad(e, 0): a copied entry is off by its input's error, a padded one is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.rules.base import BoundRule
from certnet.errors import UnsupportedLayerError
from certnet.floats import gamma, round_down
from certnet.nn.pad import check_padding, pad_of


def _ends(value: float, dtype: torch.dtype) -> tuple[float, float]:
    """(c_lo, c_hi) in ``dtype``, c_lo <= value <= c_hi (equal where ``dtype`` holds it)."""
    exact = torch.tensor(value, dtype=torch.float64)
    return float(round_down(exact, dtype)), float(-round_down(-exact, dtype))


class PadRule(BoundRule):
    """Constant padding: exact, 1-Lipschitz; see the module's docstring for the equations."""

    nonexpansive = True
    exact_interval = True

    def check(self, m: nn.Module, where: str) -> None:
        padding, _ = pad_of(m)
        if not padding or len(padding) % 2:
            raise UnsupportedLayerError(f"{where}: padding {padding} is not pairs of ints")

    def _padding(self, m: nn.Module, like: torch.Tensor) -> tuple[tuple[int, ...], float]:
        padding, value = pad_of(m)
        check_padding(padding, like.shape)
        return padding, value

    def interval(self, m, inp):
        padding, value = self._padding(m, inp.lo)
        low, high = _ends(value, inp.lo.dtype)
        return (F.pad(inp.lo, padding, "constant", low),
                F.pad(inp.hi, padding, "constant", high))

    def backward(self, m, lam, inp, slope):
        padding, value = self._padding(m, inp.lo)
        back = F.pad(lam, [-p for p in padding])  # crop the padded entries, zero-fill crops
        const = lam.new_zeros(lam.shape[:2])
        if value:
            added = F.pad(lam.new_zeros(1, 1, *inp.lo.shape[1:]), padding, "constant", 1.0)
            const = (lam * added).sum(tuple(range(2, lam.dim()))) * value
        return back, const

    def backward_error(self, m, inp):
        padding, value = self._padding(m, inp.lo)
        if not value:
            return 0.0
        outputs = F.pad(inp.lo[:1], padding)[0].numel()
        return gamma(outputs + 2, inp.lo.dtype) * abs(value)

    def drift(self, m, error, inp):
        padding, _ = self._padding(m, inp.lo)
        return F.pad(error.expand_as(inp.lo), padding)
