"""Exact rationals and float64: directed rounding and exact decimal text.

VNN-LIB numbers are decimals, i.e. exact rationals (``fractions.Fraction``); a verifier
computes in float64. These helpers cross between the two without ever losing a direction:
``round_down(q) <= q <= round_up(q)`` always, with equality exactly when ``q`` is a float64.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction

from certnet.errors import PropertyError

#: the largest finite float64, exactly
FLOAT_MAX = Fraction(sys.float_info.max)


def _nearest(q: Fraction) -> float:
    try:
        return q.numerator / q.denominator  # int / int is correctly rounded in CPython
    except OverflowError:
        return math.inf if q > 0 else -math.inf


def round_down(q: Fraction) -> float:
    """The largest float64 <= ``q`` (``-inf`` below the float64 range)."""
    f = _nearest(q)
    if f == math.inf or (math.isfinite(f) and Fraction(f) > q):
        f = math.nextafter(f, -math.inf)
    return f


def round_up(q: Fraction) -> float:
    """The smallest float64 >= ``q`` (``inf`` above the float64 range)."""
    f = _nearest(q)
    if f == -math.inf or (math.isfinite(f) and Fraction(f) < q):
        f = math.nextafter(f, math.inf)
    return f


def exact_float(q: Fraction) -> float | None:
    """``q`` as a float64 if it is one exactly, else None."""
    f = _nearest(q)
    return f if math.isfinite(f) and Fraction(f) == q else None


def decimal_text(q: Fraction) -> str:
    """``q`` as a finite decimal that reads back as exactly ``q`` (always with a point, as
    SMT-LIB decimals: ``0.0``, ``-2.5``). Every float64 has one; 1/3 has none (PropertyError)."""
    den, twos, fives = q.denominator, 0, 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        raise PropertyError(f"{q} has no finite decimal expansion: VNN-LIB cannot state it "
                            "exactly")
    k = max(twos, fives)
    digits = str(abs(q.numerator) * 10**k // q.denominator).rjust(k + 1, "0")
    whole, frac = digits[: len(digits) - k], digits[len(digits) - k:].rstrip("0")
    return f"{'-' if q < 0 else ''}{whole}.{frac or '0'}"
