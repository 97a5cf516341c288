"""The floating-point error model every rigorous bound in certnet rests on (IEEE 754 binary
arithmetic, round to nearest, gradual underflow; Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., §2.2 and §3.1).

* One operation: fl(a op b) = (a op b)(1 + d) + e, |d| <= u, u the unit roundoff (2^-53 in
  float64), |e| <= eta, the smallest subnormal (2^-1074), for + - * / and sqrt; e = 0 for
  + and - (a sum whose result is subnormal is exact) (Higham §2.1, with gradual underflow).
* A sum of n products in ANY order, with or without fused multiply-adds (so every GEMM,
  im2col convolution and transposed convolution): |fl(a . b) - a . b| <= gamma_n |a| . |b|
  + n eta, gamma_n = n u / (1 - n u).
Bounds built from these carry their own evaluation error by taking a few more terms in gamma
than the operations they cover (each extra term pays for one more rounding).
"""

from __future__ import annotations

import torch

#: sqrt of the smallest float64 subnormal: the most a 2-norm computed as the root of a sum of
#: squares can lose, per square, to underflow.
SQRT_TINY64 = 2.0**-537


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of ``dtype``: half the distance from 1 to the next float."""
    return torch.finfo(dtype).eps / 2


def eta(dtype: torch.dtype = torch.float64) -> float:
    """The smallest subnormal of ``dtype``: what one product may lose to underflow."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def gamma(n: int, dtype: torch.dtype = torch.float64) -> float:
    """gamma_n = n u / (1 - n u) (Higham, Lemma 3.1): the relative error of n roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"{n} roundings in {dtype} have no useful error bound")
    return nu / (1 - nu)


def outward(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] one ulp wider at each end: covers one rounding to nearest of each endpoint."""
    return (torch.nextafter(lo, torch.full_like(lo, -torch.inf)),
            torch.nextafter(hi, torch.full_like(hi, torch.inf)))


def round_down(value: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``value`` in ``dtype``, rounded toward -inf (toward zero for a radius: it never
    grows)."""
    if value.dtype == dtype:  # nothing to round
        return value
    down = value.to(dtype)
    return torch.where(down.to(value.dtype) > value,
                       torch.nextafter(down, torch.full_like(down, -torch.inf)), down)


def outward_to(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] in ``dtype``, rounded outward (never narrower)."""
    return round_down(lo, dtype), -round_down(-hi, dtype)
