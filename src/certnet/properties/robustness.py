"""ℓ∞ robustness as a VNN-LIB property, in the shape of the VNN-COMP MNIST files: the box
``clip([x - eps, x + eps], lo, hi)`` and the violation "some other class scores at least the
label" (one disjunct ``Y_j >= Y_label`` per class ``j != label``)."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch

from certnet.errors import InputError

from .property import Box, Case, Property, Row


def linf_robustness(x: torch.Tensor | Sequence[float], eps: float, label: int,
                    n_classes: int, lo: float = 0.0, hi: float = 1.0) -> Property:
    """The property "the class stays ``label`` on the ℓ∞ ball of radius ``eps`` around ``x``
    within ``[lo, hi]``". Bounds are exact (``x ± eps`` of float64 values is a finite binary
    fraction, written exactly); the verifier's tensors round them outward."""
    if isinstance(x, torch.Tensor):
        values = x.detach().to("cpu", torch.float64).reshape(-1).tolist()
    else:
        values = [float(v) for v in x]
    if not values:
        raise InputError("x is empty")
    if not 0 <= label < n_classes or n_classes < 2:
        raise InputError(f"label {label} is not one of {n_classes} classes (at least 2)")
    try:
        e, a, b = Fraction(eps), Fraction(lo), Fraction(hi)
        xs = [Fraction(v) for v in values]
    except (ValueError, OverflowError):
        raise InputError("x, eps, lo and hi must be finite") from None
    if e < 0 or a > b:
        raise InputError(f"need eps >= 0 and lo <= hi, got eps={eps}, lo={lo}, hi={hi}")
    if any(v < a or v > b for v in xs):
        raise InputError(f"x has values outside [{lo}, {hi}]")
    box = Box(tuple(max(v - e, a) for v in xs), tuple(min(v + e, b) for v in xs))
    rows = tuple((Row(tuple(sorted([(label, Fraction(1)), (j, Fraction(-1))])), Fraction(0)),)
                 for j in range(n_classes) if j != label)
    return Property(len(xs), n_classes, (Case(box, rows),))
