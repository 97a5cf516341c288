"""Tests written against the mutants of the ``scale_pad`` slice (``bounds/rules/scale.py``,
``bounds/rules/pad.py``, ``nn/scale.py``, ``nn/pad.py``) that survived ``scripts/mutation.sh``
(the list, with the mutant each test kills and the equivalent ones, is the ``certnet
scale_pad`` section of tests/mutation/survivors.md).

tests/test_scale_ops.py and tests/test_pad.py check the rules in float64 backward steps and
the layers through the importers, so these were open: the refusals of the layers themselves
(non-finite constants, odd or empty paddings, paddings that empty an axis: which error, which
axis, which constant), integer and meta-device constants, the float64 rounding bound the
Lipschitz certifiers read (RoundingBound, checked in exact rationals where each of its three
terms is the one that pays), the float64 Lipschitz bound of a float32 layer, one backward
step in float32 (its charge is the walk's dtype's), the pad rule's charge where every output
is padded, and the exactness of a float64 walk through a pad whose value float32 cannot
hold."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from exact import flat_rationals as _flat
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.rules import LayerInput, check_supported, rule_for
from certnet.errors import InputError, UnsupportedLayerError
from certnet.floats import round_down
from certnet.nn.lipschitz import layer_bound
from certnet.nn.pad import Pad
from certnet.nn.rounding import rounding_bound
from certnet.nn.scale import Scale

F64, F32 = torch.float64, torch.float32


def _up(t: torch.Tensor) -> torch.Tensor:
    return torch.nextafter(t, torch.full_like(t, torch.inf))


# -- the layers' own refusals ----------------------------------------------------------------
def test_scale_refuses_non_finite_constants_naming_which():
    with pytest.raises(InputError, match=r"^Scale: the weight has NaN or infinite entries$"):
        Scale(torch.tensor([1.0, float("nan")]))
    with pytest.raises(InputError, match=r"^Scale: the bias has NaN or infinite entries$"):
        Scale(torch.ones(2), torch.tensor([float("-inf"), 0.0]))
    with pytest.raises(InputError, match=r"^Scale: the bias has NaN"):
        Scale(None, float("inf"))


def test_a_divisor_must_be_given_and_have_no_zero_entry():
    message = r"^Scale: a divisor must be given and have no zero entry$"
    with pytest.raises(InputError, match=message):
        Scale(torch.tensor([2.0, 0.0]), divide=True)
    with pytest.raises(InputError, match=message):
        Scale(None, 1.0, divide=True)


def test_integer_constants_become_floats():
    m = Scale(3, -1)
    assert m.weight.dtype == m.bias.dtype == torch.get_default_dtype()
    d = Scale(torch.tensor([2, 4]), divide=True)
    assert d.weight.dtype == torch.get_default_dtype()
    x = torch.tensor([[0.5, -1.0]], dtype=F64)
    with torch.no_grad():
        assert torch.equal(m(x), x * 3 - 1) and torch.equal(d(x), x / torch.tensor([2.0, 4.0]))


def test_a_scale_is_built_on_the_meta_device_without_reading_its_constants():
    """A dry run (checkpoint.py builds layers under ``torch.device("meta")``) has no values
    to check: the finiteness and zero-divisor checks wait for real tensors."""
    with torch.device("meta"):
        m = Scale(torch.ones(3), torch.zeros(3), divide=True)
    assert m.weight.device.type == "meta" and m.bias.device.type == "meta"


def test_constants_that_do_not_broadcast_elementwise_are_refused_saying_why():
    m = Scale(torch.ones(2, 1, 4))
    with pytest.raises(InputError, match=r"^Scale: a constant of shape \(2, 1, 4\) does not "
                       r"broadcast over inputs of shape \(1, 4\) elementwise \(it may not add "
                       r"or enlarge axes, nor vary over the batch\)$"):
        m(torch.ones(1, 4))


def test_the_rule_check_names_the_layer_and_the_bad_constant():
    """Constants loaded after construction: a zero divisor entry (and not an entry of 1, which
    is a fine divisor) and non-finite weights or biases, each named."""
    ones = Scale(torch.ones(3, dtype=F64), divide=True)
    check_supported(nn.Sequential(nn.Flatten(), ones))
    layer = Scale(torch.tensor([2.0, 3.0, 4.0], dtype=F64), divide=True)
    with torch.no_grad():
        layer.weight[1] = 0.0
    with pytest.raises(UnsupportedLayerError,
                       match=r"^layer 1 \(Scale\): a divisor with a zero entry$"):
        check_supported(nn.Sequential(nn.Flatten(), layer))
    for name in ("weight", "bias"):
        m = Scale(torch.ones(2, dtype=F64), torch.ones(2, dtype=F64))
        with torch.no_grad():
            getattr(m, name)[0] = float("nan")
        with pytest.raises(UnsupportedLayerError, match=rf"^layer 1 \(Scale\): its {name} has "
                           "NaN or infinite entries$"):
            check_supported(nn.Sequential(nn.Flatten(), m))


def test_pad_refuses_bad_paddings_and_values_and_pads_with_zero_by_default():
    m = Pad([1, 1])
    assert m.value == 0.0
    with torch.no_grad():
        assert torch.equal(m(torch.ones(1, 2)), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    for padding in ([1], [1, 2, 3], []):
        with pytest.raises(InputError, match="^" + re.escape(
                f"Pad: an even, non-zero number of entries, got {padding}") + "$"):
            Pad(padding)
    with pytest.raises(InputError, match=r"^Pad: the value inf is not finite$"):
        Pad([1, 1], float("inf"))


def test_the_pad_rule_refuses_paddings_changed_after_construction():
    m = Pad([1, 1])
    for padding in ((1, 2, 3), ()):
        m.padding = padding
        with pytest.raises(UnsupportedLayerError, match="^" + re.escape(
                f"layer 1 (Pad): padding {padding} is not pairs of ints") + "$"):
            check_supported(nn.Sequential(nn.Flatten(), m))


@pytest.mark.parametrize(("padding", "shape", "message"), [
    ((-1, 0, 0, 3), (1, 5, 1), r"leaves axis 2 of \(1, 5, 1\) empty"),  # the last axis
    ((0, 0, -1, 0), (1, 1, 5), r"leaves axis 1 of \(1, 1, 5\) empty"),  # the one before it
    ((0, 0, 0, 0), (1, 3), r"of 2 axes on inputs of shape \(1, 3\): it would pad the batch"),
], ids=["last-axis", "axis-before", "batch"])
def test_pad_forward_refuses_emptying_an_axis_or_padding_the_batch(padding, shape, message):
    """An InputError (the input is at fault) naming the axis: each axis is checked against
    its own pair of the padding, the last axis against the first pair."""
    with pytest.raises(InputError, match=message) as info:
        Pad(padding)(torch.ones(shape))
    assert not isinstance(info.value, UnsupportedLayerError)


def test_reprs_say_what_each_scale_computes():
    assert repr(Scale()) == "Scale(weight=None, bias=None)"
    assert repr(Scale(torch.ones(3), torch.ones(1, 3))) == "Scale(weight=(3,), bias=(1, 3))"
    assert repr(Scale(2.0, divide=True)) == "Scale(divisor=(), bias=None)"
    assert repr(Scale(None, torch.ones(2, 1))) == "Scale(weight=None, bias=(2, 1))"


# -- factor, the Lipschitz bound and the affine primitives -----------------------------------
def test_factor_is_abs_a_in_the_dtype_asked_one_ulp_up_for_a_reciprocal():
    """|a| in ``dtype`` (the walk's), whatever the layer's own dtype: a float32 divisor's
    reciprocal is float64's rounded up (within one float64 ulp of the exact 1 / |w|)."""
    w = torch.tensor([3.0, -0.7, 2.0**-100], dtype=F32)
    for m in (Scale(w, divide=True), Scale(w), Scale(), Scale(None, torch.ones(2, dtype=F32))):
        factor = m.factor(F64)
        assert factor.dtype == F64
        if m.weight is None:
            assert float(factor) == 1.0
            continue
        exact = [1 / abs(v) if m.divide else abs(v) for v in _flat(w)]
        for f, e in zip(_flat(factor), exact, strict=True):
            assert e <= f <= e * (1 + Fraction(1, 2**51))


def test_the_l2_bound_of_a_float32_scale_is_float64_and_rounded_up():
    """layer_bound's contract: a sound float64 bound; for a float32 divisor the float64
    reciprocal rounded up, not float32's (which is 2^29 times coarser)."""
    w = torch.tensor([3.0, -0.7], dtype=F32)
    bound = layer_bound(Scale(w, divide=True))
    exact = 1 / min(abs(v) for v in _flat(w))
    assert bound.dtype == F64 and exact <= Fraction(float(bound)) <= exact * (1 + 2**-51)
    assert float(layer_bound(Scale())) == 1.0 and layer_bound(Scale()).dtype == F64


def test_the_affine_primitives_are_the_diagonal_map():
    """ScaleRule's ``linear`` (A h) and ``linear_abs`` (|A| r, rounded up) as AffineRule's
    generic consumers read them (``outputs``, ``abs_row_sums``)."""
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([3.0, -0.5, 7.0], dtype=F64)
    for m in (Scale(w, torch.ones(3, dtype=F64)), Scale(w, divide=True)):
        rule = rule_for(m)
        h = torch.randn(2, 3, generator=g, dtype=F64)
        inp = LayerInput(h, h, h)
        assert torch.equal(rule.linear(m, h, inp), m.scaled(h))
        assert rule.outputs(m, inp) == 3
        r = torch.rand(2, 3, generator=g, dtype=F64)
        for value, radius, weight in zip(_flat(rule.linear_abs(m, r, inp)), _flat(r),
                                         _flat(w.expand(2, 3)), strict=True):
            exact = radius / abs(weight) if m.divide else radius * abs(weight)
            assert abs(value - exact) <= exact * Fraction(1, 2**50)
        rows = _flat(rule.abs_row_sums(m, inp))
        assert all(v >= (1 / abs(a) if m.divide else abs(a)) for v, a in
                   zip(rows, _flat(w), strict=True))


def test_an_identity_scale_has_bounds():
    """Scale() (no weight, no bias) is the identity: factor 1, exact interval and drift."""
    m = Scale()
    lo = torch.tensor([[-1.0, 0.25]], dtype=F64)
    hi = torch.tensor([[2.0, 0.5]], dtype=F64)
    inp = LayerInput(lo, hi, lo)
    low, high = layer_interval(m, inp, rigorous=True)
    assert (low <= lo).all() and (high >= hi).all()
    assert torch.allclose(low, lo, rtol=1e-12, atol=0) and torch.allclose(high, hi, rtol=1e-12,
                                                                          atol=0)
    assert torch.allclose(rule_for(m).drift(m, torch.zeros_like(lo), inp), torch.zeros(1, 2,
                          dtype=F64), atol=1e-12)


# -- the float64 rounding bound (Lipschitz certifiers) ---------------------------------------
ROUNDING_CASES = [
    # the product rounds and the bias cancels it: only the input term pays
    ("product", Scale(torch.tensor([3.0], dtype=F64),
                      -torch.tensor([0.1], dtype=F64) * 3), [0.1]),
    ("large-product", Scale(torch.tensor([3.0 * 2**10], dtype=F64),
                            -torch.tensor([0.1], dtype=F64) * (3.0 * 2**10)), [0.1]),
    ("quotient", Scale(torch.tensor([3.0], dtype=F64), -torch.tensor([0.1], dtype=F64) / 3,
                       divide=True), [0.1]),
    # 1 + 2^53 rounds to 2^53: only the output term pays
    ("sum", Scale(None, torch.tensor([2.0**53], dtype=F64)), [1.0]),
    # 1e-300 * 1e-30 underflows to 0: only the per-entry term pays
    ("underflow", Scale(torch.tensor([1e-30], dtype=F64)), [1e-300]),
]


@pytest.mark.parametrize(("name", "m", "point"), ROUNDING_CASES,
                         ids=[c[0] for c in ROUNDING_CASES])
def test_the_registered_rounding_bound_holds_in_exact_arithmetic(name, m, point):
    """The RoundingBound the float64 forward pass is charged with (nn/scale.py ``_rounding``)
    bounds the l2 distance of fl(fl(x a) + b) to x a + b, each case one where a single term
    of the bound is all that covers the rounding (and the rounding is not zero)."""
    x = torch.tensor([point], dtype=F64)
    with torch.no_grad():
        y = m(x)
    w = Fraction(1) if m.weight is None else _flat(m.weight)[0]
    b = Fraction(0) if m.bias is None else _flat(m.bias)[0]
    exact = [v / w if m.divide else v * w for v in _flat(x)]
    exact = [v + b for v in exact]
    error = sum((c - e) ** 2 for c, e in zip(_flat(y), exact, strict=True))
    assert error > 0, name  # the case does round
    bound = Fraction(float(rounding_bound(m)(x, y)[0]))
    assert error <= bound**2, name


# -- one backward step in float32, and where every output is padded --------------------------
def _step_error(rule, m: nn.Module, inp: LayerInput, lam: torch.Tensor,
                exact_out) -> tuple[Fraction, Fraction]:
    """The largest |lam . z - (lam_h . h + const)| over the interval's ends and midpoint
    (z exact), and the charge sum_j |lam_j| rho_j, both exact, for the one row of ``lam``."""
    lam_h, const = rule.backward(m, lam, inp, "adaptive")
    rho = rule.backward_error(m, inp)
    rho = rho.double() if isinstance(rho, torch.Tensor) else torch.tensor(rho, dtype=F64)
    out_shape = lam.shape[2:]
    rho = _flat(rho.expand(1, *out_shape))
    coefficients = _flat(lam[:, 0])
    charge = sum(abs(a) * r for a, r in zip(coefficients, rho, strict=True))
    worst = Fraction(0)
    for h in (inp.lo, inp.hi, ((inp.lo.double() + inp.hi.double()) / 2).to(inp.lo.dtype)):
        z = exact_out(_flat(h))
        left = sum(a * v for a, v in zip(coefficients, z, strict=True))
        right = sum(a * v for a, v in zip(_flat(lam_h[:, 0]), _flat(h), strict=True)) + \
            Fraction(float(const[0, 0]))
        worst = max(worst, abs(left - right))
    return worst, charge


def test_a_float32_backward_step_of_scale_is_within_its_charge():
    """lam * w and lam . b round in float32: the charge is gamma_{N+16} of float32's u."""
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([3.0, -0.1, 7.0, 2.0**-20], dtype=F32)
    b = torch.tensor([0.3, 1e4, -1.0, 2.0**30], dtype=F32)
    for divide in (False, True):
        m = Scale(w, b, divide=divide)
        lo = torch.rand(1, 4, generator=g).float() - 0.5
        inp = LayerInput(lo, lo + 0.25, lo)
        weights, shifts = _flat(w), _flat(b)

        def exact_out(h, weights=weights, shifts=shifts, divide=divide):
            return [(v / a if divide else v * a) + c
                    for v, a, c in zip(h, weights, shifts, strict=True)]

        worst = Fraction(0)
        for _ in range(8):
            lam = torch.randn(1, 1, 4, generator=g).float() / 3
            error, charge = _step_error(rule_for(m), m, inp, lam, exact_out)
            assert error <= charge, divide
            worst = max(worst, error / charge)
        assert worst > Fraction(1, 10**4)  # float32 roundings: the charge is not idle


@pytest.mark.parametrize(("dtype", "small"), [(F64, 2.0**-60), (F32, 2.0**-30)],
                         ids=["float64", "float32"])
def test_a_pad_backward_step_where_every_output_is_padded_is_within_its_charge(dtype, small):
    """(-1, 2) on one entry: both outputs are the constant, so the constant's sum has N = 2
    terms and its rounding (1 + small rounds to 1) is all the step loses; the charge
    gamma_{N+2} |c| is in the walk's dtype."""
    m = Pad([-1, 2], 1.0)
    lo = torch.tensor([[0.5]], dtype=dtype)
    inp = LayerInput(lo, lo, lo)
    lam = torch.tensor([[[1.0, small]]], dtype=dtype)
    error, charge = _step_error(rule_for(m), m, inp, lam, lambda h: [Fraction(1)] * 2)
    assert error == Fraction(small)  # the sum did round
    assert error <= charge


def test_a_float32_pad_backward_step_with_a_decimal_value_is_within_its_charge():
    g = torch.Generator().manual_seed(1)
    m = Pad([2, 1, 1, 0], 0.1)
    shape = (1, 2, 3)
    lo = torch.rand(shape, generator=g).float()
    inp = LayerInput(lo, lo, lo)
    index = F.pad(torch.arange(1, 7, dtype=F64).view(shape), m.padding)[0].long().flatten()

    def exact_out(h):
        return [h[k - 1] if k else Fraction(0.1) for k in index.tolist()]

    for _ in range(8):
        lam = torch.randn(1, 1, 3, 6, generator=g).float() * \
            torch.exp2(torch.randint(-20, 20, (1, 1, 3, 6), generator=g)).float()
        error, charge = _step_error(rule_for(m), m, inp, lam, exact_out)
        assert error <= charge


# -- the pad rule's interval -----------------------------------------------------------------
@pytest.mark.parametrize("value", [0.1, 1e300, -1e-300])
def test_a_float64_walk_through_a_pad_is_exact_and_a_float32_one_is_outward(value):
    """exact_interval: in float64 the padded entries are the value itself, both ends; in
    float32 its neighbours (round_down and up), never further."""
    m = Pad([1, 0], value)
    lo = torch.tensor([[-2.0, 3.0]], dtype=F64)
    low, high = layer_interval(m, LayerInput(lo, lo, lo), rigorous=True)
    assert float(low[0, 0]) == float(high[0, 0]) == value
    assert torch.equal(low[:, 1:], lo) and torch.equal(high[:, 1:], lo)
    low, high = layer_interval(m, LayerInput(lo.float(), lo.float(), lo.float()), rigorous=True)
    exact = torch.tensor(value, dtype=F64)
    assert float(low[0, 0]) == float(round_down(exact, F32)) <= value
    assert float(high[0, 0]) == float(-round_down(-exact, F32)) >= value
