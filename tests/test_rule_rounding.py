"""Every bound rule's rounding capabilities hold in exact rational arithmetic (docs/rounding.md):
the rigorous interval contains the exact and the float64 outputs, a backward step's charge
covers its rounding for every slope choice, and the drift bounds the float forward pass; on
layers with adversarial magnitudes (huge cancelling weights beside O(1) ones, subnormal and
near-overflow entries, mixed signs)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
from exact import _conv, exact_layer, rationals
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.rules import SLOPES, LayerInput, rule_for
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, MeanShift, Negate
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, ResidualConv2d

BIG = 2.0**52


def _set(m: nn.Module, **tensors: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(m, name).copy_(value)
    return m.double().eval()


def cancelling_linear() -> nn.Module:
    """Rows whose huge terms cancel on the constant first input, beside O(1) terms."""
    m = LipschitzLinear(3, 3, dtype=torch.float64)
    return _set(m, weight=torch.tensor([[BIG, 1.0, -0.3], [-BIG, 2.0**-30, 7.0],
                                        [3e-310, -1e300, 1.0]], dtype=torch.float64),
                bias=torch.tensor([-BIG, BIG, 1e300], dtype=torch.float64))


def cancelling_conv() -> nn.Module:
    m = LipschitzConv2d(1, 2, 2, stride=1, padding=1, dtype=torch.float64)
    weight = torch.tensor([[[[1e16, 1.0], [-1e16, 0.5]]], [[[-2.0**-40, 3.0], [1e-3, -1.0]]]],
                          dtype=torch.float64)
    return _set(m, weight=weight, bias=torch.tensor([1e16, -1.5], dtype=torch.float64))


def residual_conv() -> nn.Module:
    """x + alpha conv(x) folded into the kernel alpha W + I (computed: it rounds), with a
    huge weight beside O(1) ones and an alpha that makes alpha W inexact."""
    m = ResidualConv2d(2, 3, alpha=0.3).double()
    weight = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    weight[0, 0] = torch.tensor([[1e16, 1.0, -0.7], [0.1, 3.0, -1e16], [2.0**-40, 0.0, 5.0]])
    weight[1, 1, 1] = torch.tensor([-1.3, 7.0, 0.9])
    weight[0, 1, 2, 2], weight[1, 0, 0, 0] = 1e-3, -2.5
    return _set(m, weight=weight, bias=torch.tensor([3e15, -0.25], dtype=torch.float64))


def _exact_residual_conv(m: ResidualConv2d) -> Callable[[np.ndarray], np.ndarray]:
    """(alpha W + I) * v + b exactly: alpha (W * v) + v + b."""
    conv, alpha = _conv(m), Fraction(m.alpha)  # W * v + b with the layer's own W
    bias = rationals(m.bias).reshape(-1, 1, 1)
    return lambda v: alpha * (conv(v) - bias) + v + bias


def batchnorm() -> nn.Module:
    m = nn.BatchNorm1d(3, eps=0.0)
    _set(m, weight=torch.tensor([1e8, -0.5, 3.0]), bias=torch.tensor([-1e8, 0.25, 1e-9]))
    with torch.no_grad():  # exact squares: sqrt is exact in the reference
        m.running_var.copy_(torch.tensor([4.0, 2.0**-40, 2.0**-14]))
        m.running_mean.copy_(torch.tensor([1.0 + 2.0**-30, -7.0, 0.1]))
    return m.double().eval()


def clipped_relu() -> nn.Module:
    return _set(ClippedReLU([4]), threshold=torch.tensor([0.5, 1e8, -1.0, 2.0**-40]))


def clipped_minmax() -> nn.Module:
    return _set(ClippedMinMax([4]), lower=torch.tensor([-1.0, -1e8]),
                upper=torch.tensor([2.0**-30, 1e8]))


def linf_dist() -> nn.Module:
    m = LinfDist(3, 2, bias=True)
    return _set(m, weight=torch.tensor([[BIG, 0.5, -1e-300], [1.0, -2.0, 0.25]]),
                bias=torch.tensor([-BIG, 0.125]))


def mean_shift() -> nn.Module:
    m = MeanShift(3)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([BIG, -0.5, 1e-300]))
    return m.double().eval()


def _exact_clipped_relu(m: ClippedReLU) -> Callable[[np.ndarray], np.ndarray]:
    t = rationals(m.threshold)
    return lambda v: np.array([max(min(a, b), Fraction(0)) for a, b in zip(v, t, strict=True)],
                              dtype=object)


def _exact_clipped_minmax(m: ClippedMinMax) -> Callable[[np.ndarray], np.ndarray]:
    low, high = rationals(m.lower), rationals(m.upper)

    def apply(v: np.ndarray) -> np.ndarray:
        half = len(v) // 2
        pairs = list(zip(v[:half], v[half:], strict=True))
        mins = [max(min(a, b), lo) for (a, b), lo in zip(pairs, low, strict=True)]
        maxs = [min(max(a, b), hi) for (a, b), hi in zip(pairs, high, strict=True)]
        return np.array(mins + maxs, dtype=object)
    return apply


#: (name, layer factory, one input's shape, box magnitude)
CASES = [
    ("linear", cancelling_linear, (3,), 1.0),
    ("conv", cancelling_conv, (1, 2, 2), 1.0),
    ("residual-conv", residual_conv, (2, 3, 3), 1.0),
    ("batchnorm", batchnorm, (3,), 10.0),
    ("normalize", lambda: Normalize([BIG], [3.0]).double(), (1, 1, 3), 1.0),
    ("relu", nn.ReLU, (4,), 1e8),
    ("minmax", MinMax, (4,), 1e8),
    ("clipped-relu", clipped_relu, (4,), 1e8),
    ("clipped-minmax", clipped_minmax, (4,), 1e8),
    ("flatten", nn.Flatten, (1, 2, 2), 1.0),
    ("linf-dist", linf_dist, (3,), 1.0),
    ("mean-shift", mean_shift, (3,), 1.0),
    ("negate", Negate, (3,), 1e300),
]
EXACT = {ClippedReLU: _exact_clipped_relu, ClippedMinMax: _exact_clipped_minmax,
         ResidualConv2d: _exact_residual_conv}


def _exact(m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    return EXACT[type(m)](m) if type(m) in EXACT else exact_layer(m)


def _box(shape: tuple[int, ...], scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A box (1, *shape) with ends of mixed signs and magnitudes (log-uniform over 2^-40 ..
    scale, some degenerate, some containing 0), the first input constant."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    size = torch.exp2(torch.empty(shape, dtype=f64).uniform_(-40, 0, generator=g)) * scale
    lo = (torch.rand(shape, generator=g, dtype=f64) - 0.5).sign() * size
    width = torch.rand(shape, generator=g, dtype=f64) * size * \
        torch.randint(0, 2, shape, generator=g)
    lo.view(-1)[0] = 1.0
    hi = lo + width
    hi.view(-1)[0] = 1.0
    return lo.unsqueeze(0), hi.unsqueeze(0)


def _points(lo: torch.Tensor, hi: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Every vertex of the box (up to 2^6 of them) and random points inside, float64."""
    g = torch.Generator().manual_seed(seed)
    flat_lo, flat_hi = lo.flatten(), hi.flatten()
    n = flat_lo.numel()
    corners = list(itertools.islice(itertools.product((0, 1), repeat=n), 64))
    points = [torch.where(torch.tensor(c, dtype=torch.bool), flat_hi, flat_lo) for c in corners]
    for _ in range(16):
        points.append((flat_lo + torch.rand(n, generator=g, dtype=torch.float64) *
                       (flat_hi - flat_lo)).clamp(flat_lo, flat_hi))
    return [p.view(lo.shape) for p in points]


def _fractions(t: torch.Tensor) -> np.ndarray:
    return rationals(t[0])


def _setup(factory, shape, scale, seed):
    m = factory()
    lo, hi = _box(shape, scale, seed)
    inp = LayerInput(lo, hi, (lo + hi) / 2)
    return m, inp, _exact(m), _points(lo, hi, seed + 1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("name", "factory", "shape", "scale"), CASES, ids=[c[0] for c in CASES])
def test_rigorous_interval_holds_exact_and_float_outputs(name, factory, shape, scale, seed):
    m, inp, exact, points = _setup(factory, shape, scale, seed)
    lo, hi = layer_interval(m, inp, rigorous=True)
    low, high = _fractions(lo).reshape(-1), _fractions(hi).reshape(-1)
    for h in points:
        with torch.no_grad():
            computed = _fractions(m(h)).reshape(-1)
        for value in (exact(_fractions(h)).reshape(-1), computed):
            assert all(a <= v <= b for a, v, b in zip(low, value, high, strict=True))


def test_the_plain_interval_misses_the_exact_output_of_a_cancelling_layer():
    """Non-vacuity: without the widening, the float interval of the cancelling layer excludes
    exact outputs (its O(1) terms are lost next to 2^52)."""
    misses = 0
    for seed in range(3):
        m, inp, exact, points = _setup(cancelling_linear, (3,), 1.0, seed)
        lo, hi = layer_interval(m, inp)
        low, high = _fractions(lo).reshape(-1), _fractions(hi).reshape(-1)
        for h in points:
            value = exact(_fractions(h)).reshape(-1)
            misses += sum(not a <= v <= b for a, v, b in zip(low, value, high, strict=True))
    assert misses > 0


def _slopes(rows: int, inp: LayerInput, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    alpha = torch.rand(1, rows, *inp.lo.shape[1:], generator=g, dtype=torch.float64)
    return [*SLOPES, alpha]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("name", "factory", "shape", "scale"), CASES, ids=[c[0] for c in CASES])
def test_a_backward_step_with_its_charge_is_a_valid_lower_bound(name, factory, shape, scale,
                                                                seed):
    m, inp, exact, points = _setup(factory, shape, scale, seed)
    rule = rule_for(m)
    if not rule.relaxable:
        pytest.skip("no linear relaxation (interval only)")
    out_shape = m(inp.lo).shape[1:]
    g = torch.Generator().manual_seed(seed + 7)
    rows = 4
    lam = (torch.randn(1, rows, *out_shape, generator=g, dtype=torch.float64) *
           torch.exp2(torch.randint(-30, 30, (1, rows, *out_shape), generator=g)).double())
    with torch.no_grad():
        rho = rule.backward_error(m, inp)
    assert rho is not None
    rho = torch.as_tensor(rho, dtype=torch.float64).expand(1, *out_shape)
    for slope in _slopes(rows, inp, seed):
        if isinstance(slope, torch.Tensor) and type(m) is not nn.ReLU:
            continue  # optimisable slopes are ReLU's (alpha-CROWN)
        with torch.no_grad():
            lam_h, const = rule.backward(m, lam, inp, slope)
        charge = (lam.abs() * rho.unsqueeze(1)).flatten(2).sum(2)
        for h in points:
            z = exact(_fractions(h)).reshape(-1)
            hh = _fractions(h).reshape(-1)
            for r in range(rows):
                left = sum(a * b for a, b in zip(_fractions(lam[:, r]).reshape(-1), z,
                                                 strict=True))
                right = sum(a * b for a, b in zip(_fractions(lam_h[:, r]).reshape(-1), hh,
                                                  strict=True)) + Fraction(float(const[0, r]))
                assert left >= right - Fraction(float(charge[0, r])), (slope, r)


def test_without_its_charge_a_cancelling_step_claims_too_much():
    """Non-vacuity: the float backward step of the cancelling layer, uncharged, is not a valid
    lower bound somewhere in the box."""
    wrong = 0
    for seed in range(3):
        m, inp, exact, points = _setup(cancelling_linear, (3,), 1.0, seed)
        lam = torch.tensor([[[1.0, 1.0, 0.0]]], dtype=torch.float64)
        lam_h, const = rule_for(m).backward(m, lam, inp, "adaptive")
        for h in points:
            left = sum(exact(_fractions(h)).reshape(-1)[:2])
            right = sum(a * b for a, b in zip(_fractions(lam_h[:, 0]).reshape(-1),
                                              _fractions(h).reshape(-1), strict=True))
            wrong += left < right + Fraction(float(const[0, 0]))
    assert wrong > 0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("name", "factory", "shape", "scale"), CASES, ids=[c[0] for c in CASES])
def test_drift_bounds_the_float_forward_pass(name, factory, shape, scale, seed):
    m, inp, exact, points = _setup(factory, shape, scale, seed)
    drift = rule_for(m).drift(m, torch.zeros_like(inp.lo), inp)
    assert drift is not None
    bound = _fractions(drift.expand(1, *m(inp.lo).shape[1:])).reshape(-1)
    for h in points:
        with torch.no_grad():
            computed = _fractions(m(h)).reshape(-1)
        value = exact(_fractions(h)).reshape(-1)
        assert all(abs(c - v) <= b for c, v, b in zip(computed, value, bound, strict=True))


def test_relu_upper_line_rounds_below_relu_without_its_charge():
    """Non-vacuity for the ReLU relaxation: the computed upper line through (lo, 0) and
    (hi, hi) often passes below (hi, hi); with lam = -1 the uncharged step then claims more
    than -relu(hi), and the charge covers it."""
    g = torch.Generator().manual_seed(0)
    lo = -torch.rand(1, 200, generator=g, dtype=torch.float64) * 3
    hi = torch.rand(1, 200, generator=g, dtype=torch.float64) * 3
    inp = LayerInput(lo, hi, hi)
    relu = nn.ReLU()
    rho = rule_for(relu).backward_error(relu, inp)
    below = 0
    for k in range(200):
        unit = torch.zeros(1, 1, 200, dtype=torch.float64)
        unit[..., k] = -1.0
        coef, const = rule_for(relu).backward(relu, unit, inp, "adaptive")
        top = Fraction(float(hi[0, k]))
        claimed = Fraction(float(coef[0, 0, k])) * top + Fraction(float(const[0, 0]))
        below += claimed > -top
        assert claimed - Fraction(float(rho[0, k])) <= -top
    assert below > 0


def test_relu_drift_is_zero_only_where_both_inputs_are_nonpositive():
    """The ReLU drift contract in both of its uses: the interval holds one of the two inputs
    (the exact one in a rigorous walk, the float one for the clean pass) and the other lies
    within ``error`` of it. Zero only where hi <= -error; one ulp less margin keeps it."""
    relu = nn.ReLU()
    error = torch.tensor([[1e-16, 1e-16, 1e-16, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[-2e-16, -1e-16, -5e-17, 0.0]], dtype=torch.float64)
    drift = rule_for(relu).drift(relu, error, LayerInput(hi - 1, hi, hi))
    assert drift.tolist() == [[0.0, 0.0, 1e-16, 0.0]]
    # the clean-pass case: float input -5e-17 in the interval, exact input 5e-17 within the
    # error: relu differs by 5e-17, which the drift must cover
    exact, computed = Fraction(5, 10**17), Fraction(-5e-17)
    assert abs(max(exact, 0) - max(computed, 0)) <= Fraction(float(drift[0, 2]))
