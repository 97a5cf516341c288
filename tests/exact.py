"""Exact rational arithmetic for checking certificates (tests/test_exact_rounding.py).

Every stored weight and every float64 point is a rational number, so the network's function
"in exact arithmetic with its stored weights" (README, Guarantees) can be evaluated with
``fractions.Fraction`` and no rounding at all. This module holds that exact forward pass, the
exact l_inf Lipschitz constant of the margin certificate, and the threat sets: float64 points
that provably lie in a norm ball intersected with the pixel box (decided exactly, in integer
multiples of 2^-1074 against the rational radius). The one irrational step, the p-th root of an
l_p-dist layer at finite p, is taken to a relative 10^-60 (``lp_norm``).
"""

from __future__ import annotations

import decimal
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from certnet.graph.lower import Step
from certnet.graph.ops import Add, Concat
from certnet.nn.activations import MinMax
from certnet.nn.linf_dist import LinfDist, MeanShift, Negate
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize
from certnet.nn.reshape import Reshape

ZERO = Fraction(0)


def rationals(t: torch.Tensor) -> np.ndarray:
    """The exact values of a float tensor, as an object array of Fractions of the same shape
    (float32 and float64 entries are dyadic rationals; NaN and inf raise)."""
    values = [Fraction(v) for v in t.detach().double().flatten().tolist()]
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(tuple(t.shape))


def flat_rationals(t: torch.Tensor) -> list[Fraction]:
    """:func:`rationals` of ``t``, flattened to a list."""
    return list(rationals(t).reshape(-1))


def exact_sqrt(q: Fraction) -> Fraction:
    """sqrt(q) for a q whose numerator and denominator are perfect squares, else ValueError."""
    num, den = math.isqrt(q.numerator), math.isqrt(q.denominator)
    if q < 0 or num * num != q.numerator or den * den != q.denominator:
        raise ValueError(f"{q} is not the square of a rational")
    return Fraction(num, den)


def _per_channel(shape: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """``values`` (one per channel, or one shared) shaped to broadcast over the channel axis
    0 of an input of ``shape``."""
    values = values.reshape(-1)
    if len(values) == 1:
        values = np.repeat(values, shape[0])
    return values.reshape(-1, *([1] * (len(shape) - 1)))


def _conv(m: nn.Conv2d) -> Callable[[np.ndarray], np.ndarray]:
    """Zero-padded 2-d convolution of one (C, H, W) input, any stride (no dilation/groups)."""
    if m.dilation != (1, 1) or m.groups != 1 or m.padding_mode != "zeros" or \
            isinstance(m.padding, str):
        raise TypeError("exact conv: zero padding, dilation 1 and groups 1 only")
    w = rationals(m.weight)
    rows = w.reshape(w.shape[0], -1)
    bias = None if m.bias is None else rationals(m.bias)
    (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding

    def apply(v: np.ndarray) -> np.ndarray:
        c, h, width = v.shape
        padded = np.full((c, h + 2 * ph, width + 2 * pw), ZERO, dtype=object)
        padded[:, ph:ph + h, pw:pw + width] = v
        oh, ow = (h + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
        out = np.full((w.shape[0], oh, ow), ZERO, dtype=object)
        for i in range(oh):
            for j in range(ow):
                out[:, i, j] = rows.dot(padded[:, i * sh:i * sh + kh,
                                               j * sw:j * sw + kw].reshape(-1))
        return out if bias is None else out + bias.reshape(-1, 1, 1)
    return apply


def _batchnorm(m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Eval-mode BatchNorm: (v - mean) * weight / sqrt(var + eps) + bias, with the square root
    taken exactly (the construction must make var + eps a rational square)."""
    if not m.track_running_stats or m.running_var is None:
        raise TypeError("exact BatchNorm needs running statistics")
    var = rationals(m.running_var) + Fraction(m.eps)
    scale = np.array([1 / exact_sqrt(q) for q in var], dtype=object)
    if m.weight is not None:
        scale = scale * rationals(m.weight)
    mean = rationals(m.running_mean)
    bias = None if m.bias is None else rationals(m.bias)

    def apply(v: np.ndarray) -> np.ndarray:
        out = (v - _per_channel(v.shape, mean)) * _per_channel(v.shape, scale)
        return out if bias is None else out + _per_channel(v.shape, bias)
    return apply


def _relu(v: np.ndarray) -> np.ndarray:
    return np.array([max(t, ZERO) for t in v.reshape(-1)], dtype=object).reshape(v.shape)


def _minmax(v: np.ndarray) -> np.ndarray:
    """Channel pairs (c, c + C/2): the first half gets the minima, the second the maxima."""
    half = v.shape[0] // 2
    a, b = v[:half].reshape(-1), v[half:].reshape(-1)
    low = [min(s, t) for s, t in zip(a, b, strict=True)]
    high = [max(s, t) for s, t in zip(a, b, strict=True)]
    return np.array(low + high, dtype=object).reshape(v.shape)


def _affine(weight: np.ndarray, bias: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    def apply(v: np.ndarray) -> np.ndarray:
        out = weight.dot(v)
        return out if bias is None else out + bias
    return apply


#: Relative accuracy of ``lp_norm`` at finite p.
LP_ACCURACY = Fraction(1, 10**60)


def lp_norm(values: Sequence[Fraction], p: float) -> Fraction:
    """||values||_p (Zhang et al. 2021's l_p-dist neuron): exact at p = inf, else within a
    relative ``LP_ACCURACY`` (m (sum (|v| / m)^p)^(1/p), m = max |v|, in 80-digit decimals:
    the quotients and the sum rounded, the root as exp(ln(s) / p), each correctly rounded)."""
    m = max(abs(v) for v in values)
    if math.isinf(p) or m == 0:
        return m
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emin = 80, -(10**9)
        power = decimal.Decimal(p)
        s = sum((decimal.Decimal(q.numerator) / q.denominator) ** power
                for q in (abs(v) / m for v in values))
        root = (s.ln() / power).exp()
    return m * Fraction(root)


def _linf_dist(m: LinfDist) -> Callable[[np.ndarray], np.ndarray]:
    """u_o = ||v - w_o||_p (+ b_o): the l_p-dist neuron (``lp_norm``)."""
    w = rationals(m.weight)
    bias = None if m.bias is None else rationals(m.bias)

    def apply(v: np.ndarray) -> np.ndarray:
        out = np.array([lp_norm([a - b for a, b in zip(v, row, strict=True)], m.p)
                        for row in w], dtype=object)
        return out if bias is None else out + bias
    return apply


def exact_layer(m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The function one layer computes on one exact input (no batch axis), in eval mode, with
    the layer's current weights read once."""
    kind = type(m)
    if kind is nn.Flatten:
        return lambda v: v.reshape(-1)
    if kind is Reshape:
        return lambda v: v.reshape(m.shape)
    if kind is nn.Identity:
        return lambda v: v
    if kind in (nn.Linear, LipschitzLinear):
        return _affine(rationals(m.weight), None if m.bias is None else rationals(m.bias))
    if kind in (nn.Conv2d, LipschitzConv2d):
        return _conv(m)
    if kind is nn.ReLU:
        return _relu
    if kind is MinMax:
        return _minmax
    if kind is Normalize:
        mean, std = rationals(m.mean), rationals(m.std)
        return lambda v: (v - _per_channel(v.shape, mean)) / _per_channel(v.shape, std)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _batchnorm(m)
    if kind is LinfDist:
        return _linf_dist(m)
    if kind is MeanShift:
        mean = rationals(m.running_mean)
        return lambda v: v - _per_channel(v.shape, mean)
    if kind is Negate:
        return lambda v: -v
    if kind is Add:
        return lambda a, b: a + b
    if kind is Concat:
        return lambda *parts: np.concatenate(parts, axis=m.dim - 1)  # no batch axis here
    if kind is Step:
        return _step(m)
    raise TypeError(f"no exact rule for {kind.__name__}")


def _step(m: Step) -> Callable[[np.ndarray], np.ndarray]:
    """A lowered graph node: its operator on its slots, the kept slots passed on."""
    op = exact_layer(m.op)

    def step(v: np.ndarray) -> np.ndarray:
        flat, slots, start = v.reshape(-1), [], 0
        for size, shape in zip(m.sizes, m.shapes, strict=True):
            slots.append(flat[start:start + size].reshape(shape))
            start += size
        out = op(*[slots[i] for i in m.inputs])
        if m.last:
            return out
        return np.concatenate([slots[k].reshape(-1) for k in m.keep] + [out.reshape(-1)])
    return step


class ExactNet:
    """A network evaluated in exact rational arithmetic with its stored weights (read when
    this is built), every layer in eval mode."""

    def __init__(self, layers: nn.Sequential) -> None:
        self.steps = [exact_layer(m) for m in layers]

    def __call__(self, x: np.ndarray) -> list[Fraction]:
        """The logits at one float64 input ``x`` (the input's shape, no batch axis)."""
        v = np.empty(x.size, dtype=object)
        v[:] = [Fraction(float(t)) for t in x.reshape(-1)]
        v = v.reshape(x.shape)
        for step in self.steps:
            v = step(v)
        return list(v.reshape(-1))


def linf_lipschitz_constant(layers: nn.Sequential) -> Fraction | None:
    """The l_inf Lipschitz constant the margin certificate's proof uses (certnet/certifiers/
    linf_lipschitz.py): the product of the layers' l_inf -> l_inf bounds (max row l1 norm of
    a linear layer, max 1/|std| of Normalize, 1 for l_inf-dist layers at p = inf and for the
    1-Lipschitz layers), computed exactly; None if a layer has no such bound here."""
    total = Fraction(1)
    for m in layers:
        kind = type(m)
        if kind in (nn.Flatten, nn.Identity, nn.ReLU, MinMax, MeanShift, Negate):
            continue
        if kind is LinfDist and math.isinf(m.p):
            continue
        if kind in (nn.Linear, LipschitzLinear):
            w = rationals(m.weight)
            total *= max(sum(abs(t) for t in row) for row in w)
        elif kind is Normalize:
            total *= max(1 / abs(s) for s in rationals(m.std).reshape(-1))
        else:
            return None
    return total


# -- threat sets ---------------------------------------------------------------------------------
#: Every float64 is an integer multiple of 2^-1074: exact comparisons in integers.
UNITS = 2**1074


def _units(v: float) -> int:
    """``v`` as an exact integer multiple of 2^-1074."""
    num, den = v.as_integer_ratio()
    return num * (UNITS // den)


@dataclass(frozen=True)
class Ball:
    """{x' : ||x' - centre|| <= radius (``closed``) or < radius (open), 0 <= x' <= 1}, the
    radius exact; ``centre`` a flat float64 array."""

    centre: np.ndarray
    radius: Fraction
    norm: str
    closed: bool

    def contains(self, p: np.ndarray) -> bool:
        """Whether the float64 point ``p`` lies in the set, decided exactly (a float64 test
        with a margin of safety first, the exact one where that cannot tell)."""
        if not (np.all(p >= 0) and np.all(p <= 1)):
            return False
        r = float(self.radius)
        delta = np.abs(p - self.centre)
        size = float(delta.max()) if self.norm == "linf" else float(np.dot(delta, delta))
        # rigorous for l_inf; for l2 while the squares neither underflow nor lose digits
        if (self.norm == "linf" or r > 1e-100) and \
                size <= (r if self.norm == "linf" else r * r) * (1 - 1e-12):
            return True
        deltas = [_units(a) - _units(b) for a, b in zip(p.tolist(), self.centre.tolist(),
                                                         strict=True)]
        num, den = self.radius.numerator, self.radius.denominator
        if self.norm == "linf":
            exact, bound = max(abs(t) for t in deltas) * den, num * UNITS
        else:
            exact, bound = sum(t * t for t in deltas) * den * den, (num * UNITS) ** 2
        return exact <= bound if self.closed else exact < bound

    def fit(self, p: np.ndarray) -> np.ndarray | None:
        """``p`` clipped to the pixel box and, if float rounding left it just outside the
        ball, pulled onto the ball and towards the centre until it lies in the set exactly;
        None if that fails."""
        p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
        if self.contains(p):
            return p
        c, r = self.centre, float(self.radius)
        delta = p - c
        if self.norm == "linf":
            delta = np.clip(delta, -r, r)
        else:
            delta = delta * min(1.0, r / max(float(np.linalg.norm(delta)), 1e-300))
        for k in range(6):
            q = np.clip(c + delta * (1 - 2.0 ** (6 * k - 48)), 0.0, 1.0)
            if self.contains(q):
                return q
        for _ in range(8):  # one ulp towards the centre in every coordinate that differs
            q = np.nextafter(q, c)
            if self.contains(q):
                return q
        return None

    def sign_vectors(self, limit: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Every vector of +-1 (at most ``limit``: random ones beyond)."""
        d = len(self.centre)
        if 2 ** d <= limit:
            return [np.array(s, dtype=np.float64) for s in itertools.product((-1, 1), repeat=d)]
        return [rng.choice([-1.0, 1.0], size=d) for _ in range(limit)]

    def candidates(self, rng: np.random.Generator, directions: list[np.ndarray],
                   randoms: int = 3, vertices: int = 16) -> list[np.ndarray]:
        """Float64 points to try: the centre; the vertices of the l_inf box (l2: the axis
        points and the diagonal points on the sphere); the points one radius down each of
        ``directions`` (the worst point of a margin with that gradient: sign(g) in l_inf,
        g / ||g|| in l2); random points of the set, last."""
        c, r, d = self.centre, float(self.radius), len(self.centre)
        raw = [c]
        eye = np.eye(d)
        raw += [c + r * s * e for e in eye for s in (-1, 1)]
        signs = self.sign_vectors(vertices, rng)
        if self.norm == "linf":
            raw += [c + r * s for s in signs]
            raw += [c - r * np.sign(g) for g in directions]
        else:
            raw += [c + r * s / math.sqrt(d) for s in signs]
            raw += [c - r * g / np.linalg.norm(g) for g in directions if np.linalg.norm(g) > 0]
        for _ in range(randoms):
            if self.norm == "linf":
                raw.append(c + r * rng.uniform(-1, 1, size=d))
            else:
                g = rng.normal(size=d)
                raw.append(c + r * rng.uniform() ** (1 / d) * g / np.linalg.norm(g))
        return raw


def unique_points(points: list[np.ndarray]) -> list[np.ndarray]:
    """``points`` without repeats (compared bit for bit)."""
    seen, out = set(), []
    for p in points:
        key = p.tobytes()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
