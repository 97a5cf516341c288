"""What a VNN-LIB 1.0 property says, exactly (VNN-LIB 1.0 standard, www.vnnlib.org; the
VNN-COMP rules document uses the same files).

A VNN-LIB file states the **violation**: it asserts conditions on the inputs ``X`` and outputs
``Y`` of a network; the property *holds* (``unsat``) iff no input satisfies them. certnet reads
a file into a disjunction of **cases**, each an input box and, for that box, the violation as a
disjunction of conjunctions of linear inequalities over ``Y``::

    violated  <=>  exists case, x in case.box, disjunct in case.violation:
                   every row of the disjunct holds at y = f(x)

Plain ``assert``s over single inputs give one case; a top-level ``(or (and ...))`` over inputs
gives several boxes, and the mixed form ``(or (and (X..) (Y..)) ...)`` (ACAS Xu style) gives
one case per distinct box. Cases with equal boxes are merged.

Numbers stay exact (``Fraction``). A row reads ``sum(c_j * Y_j) <= d``, or ``< d`` when
``strict``. Strict rows and bounds are exact here, so :meth:`Property.check_counterexample`
checks a witness against what the file really says; the float64 tensors for the verifier drop
strictness (the closure), which is sound for "holds": proving the larger, non-strict violation
set empty proves the strict one empty too.

Soundness of the float64 tensors (a verifier proves "for every x in the box, every disjunct has
a row with c . y > d"):

- boxes are rounded **outward** (``lo`` down, ``hi`` up): a proof over a larger box covers the
  exact one;
- ``C`` must be exact in float64 (else :class:`PropertyError`: certnet refuses rather than round
  a coefficient, since the sign of ``y`` decides which way would be safe);
- ``d`` is rounded **up**: ``c . y > d_up >= d`` implies ``c . y > d`` (and ``>= d`` for a
  strict row), so a disjunct refuted with ``d_up`` is refuted exactly. Rounding down would not
  be sound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from certnet.errors import InputError, PropertyError

from .exact import exact_float, round_down, round_up


@dataclass(frozen=True)
class Row:
    """``sum(c * Y_j for j, c in terms) <= rhs`` (``<`` when ``strict``); ``terms`` sorted by
    output index, coefficients non-zero. ``where`` (``file:line:col``) is not compared."""

    terms: tuple[tuple[int, Fraction], ...]
    rhs: Fraction
    strict: bool = False
    where: str = field(default="", compare=False)

    def holds_at(self, y: Sequence[Fraction]) -> bool:
        """Exactly, whether the row holds at ``y``."""
        lhs = sum((c * y[j] for j, c in self.terms), Fraction(0))
        return lhs < self.rhs if self.strict else lhs <= self.rhs


@dataclass(frozen=True)
class Box:
    """``lo[i] <= X_i <= hi[i]``; indices in ``open_lo`` / ``open_hi`` are strict (``<``)."""

    lo: tuple[Fraction, ...]
    hi: tuple[Fraction, ...]
    open_lo: frozenset[int] = frozenset()
    open_hi: frozenset[int] = frozenset()

    def contains(self, x: Sequence[Fraction]) -> bool:
        """Exactly, whether ``x`` lies in the box."""
        for i, (lo, hi, v) in enumerate(zip(self.lo, self.hi, x, strict=True)):
            if v < lo or v > hi:
                return False
            if (v == lo and i in self.open_lo) or (v == hi and i in self.open_hi):
                return False
        return True

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` as float64, rounded outward (lo down, hi up)."""
        lo = torch.tensor([round_down(v) for v in self.lo], dtype=torch.float64)
        hi = torch.tensor([round_up(v) for v in self.hi], dtype=torch.float64)
        return lo, hi

    def inner_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lo, hi)`` as float64 rounded inward (lo up, hi down; a strict end one float
        further in): every float64 point between them lies in the box, so a search for
        counterexamples stays inside it. None if no float64 point is in the box."""
        lo = [round_up(v) for v in self.lo]
        hi = [round_down(v) for v in self.hi]
        lo = [math.nextafter(v, math.inf) if i in self.open_lo and v == self.lo[i] else v
              for i, v in enumerate(lo)]
        hi = [math.nextafter(v, -math.inf) if i in self.open_hi and v == self.hi[i] else v
              for i, v in enumerate(hi)]
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            return None
        return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


#: a conjunction of rows; the violation of a case is a disjunction of these
Conjunction = tuple[Row, ...]


@dataclass(frozen=True)
class Case:
    """One input box and, over it, the violation: any disjunct with all of its rows holding."""

    box: Box
    violation: tuple[Conjunction, ...]


@dataclass(frozen=True)
class Property:
    """A VNN-LIB property: ``n_inputs`` X's, ``n_outputs`` Y's, violated iff some case is."""

    n_inputs: int
    n_outputs: int
    cases: tuple[Case, ...]

    def __post_init__(self) -> None:
        if self.n_inputs < 1 or self.n_outputs < 1:
            raise PropertyError("a property needs at least one input and one output")
        if not self.cases:
            raise PropertyError("a property needs at least one case")
        for case in self.cases:
            box = case.box
            if len(box.lo) != self.n_inputs or len(box.hi) != self.n_inputs:
                raise PropertyError(f"a box has {len(box.lo)}/{len(box.hi)} bounds for "
                                    f"{self.n_inputs} inputs")
            for i, (lo, hi) in enumerate(zip(box.lo, box.hi, strict=True)):
                if lo > hi or (lo == hi and (i in box.open_lo or i in box.open_hi)):
                    raise PropertyError(f"the box of X_{i} is empty ({lo} .. {hi})")
            if not case.violation or not all(case.violation):
                raise PropertyError("a case needs at least one disjunct of at least one row")
            for conj in case.violation:
                for row in conj:
                    idx = [j for j, _ in row.terms]
                    if (not idx or idx != sorted(set(idx)) or idx[0] < 0
                            or idx[-1] >= self.n_outputs or any(c == 0 for _, c in row.terms)):
                        raise PropertyError(f"malformed row {row}")

    @property
    def boxes(self) -> tuple[Box, ...]:
        """The input box of every case."""
        return tuple(case.box for case in self.cases)

    def box_tensors(self, case: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` of a case's box as float64, rounded outward."""
        return self.cases[case].box.tensors()

    def violation_tensors(self, case: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per disjunct of a case, ``(C, d)``: ``C`` (k x n_outputs) exact, ``d`` (k) rounded up;
        the disjunct is ``C y <= d`` (non-strict: the closure). PropertyError if a coefficient
        is not a float64."""
        out = []
        for conj in self.cases[case].violation:
            c = torch.zeros(len(conj), self.n_outputs, dtype=torch.float64)
            d = torch.empty(len(conj), dtype=torch.float64)
            for k, row in enumerate(conj):
                for j, coef in row.terms:
                    f = exact_float(coef)
                    if f is None:
                        raise PropertyError(
                            f"{row.where + ': ' if row.where else ''}the coefficient {coef} of "
                            f"Y_{j} is not a float64; certnet refuses rather than round a "
                            "coefficient (scale the constraint to make it exact)")
                    c[k, j] = f
                d[k] = round_up(row.rhs)
            out.append((c, d))
        return out

    def check_counterexample(self, x: torch.Tensor | Sequence[float],
                             y: torch.Tensor | Sequence[float]) -> bool:
        """Exactly (rationals from the float64 values, no rounding), whether ``x`` lies in a
        case's box (of the exact property) and ``y`` satisfies a violation disjunct of that
        case. What makes a ``sat`` answer trustworthy; NaN / infinite values never do."""
        xs, ys = _exact(x, self.n_inputs, "x"), _exact(y, self.n_outputs, "y")
        if xs is None or ys is None:
            return False
        return any(case.box.contains(xs)
                   and any(all(row.holds_at(ys) for row in conj) for conj in case.violation)
                   for case in self.cases)


def _exact(v: torch.Tensor | Sequence[float], n: int, name: str) -> list[Fraction] | None:
    if isinstance(v, torch.Tensor):
        values = v.detach().to("cpu", torch.float64).reshape(-1).tolist()
    else:
        values = [float(e) for e in v]
    if len(values) != n:
        raise InputError(f"{name} has {len(values)} values, the property has {n}")
    try:
        return [Fraction(e) for e in values]
    except (ValueError, OverflowError):  # NaN / inf: no witness
        return None
