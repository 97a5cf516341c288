"""Tests written against the mutants of the ``piecewise`` slice (``bounds/rules/piecewise.py``:
the LeakyReLU and MaxPool2d rules) that survived ``scripts/mutation.sh`` (the list, with the
mutant each test kills and the equivalent ones, is the ``certnet.bounds.rules.piecewise``
section of tests/mutation/survivors.md).

tests/test_leaky_relu.py and tests/test_maxpool.py check the rules in float64 over random
boxes, so these were open: which LeakyReLU neurons CROWN tightens, the exactness of a zero
slope's interval, float32 intervals, drifts and backward steps (their charges are the walk's
dtype's), a drift that must cover a move of the whole input error, the pool's refusals (which
setting, which layer, which shape), one-element kernel tuples and empty strides, the number
of windows sharing an input (the pool's Lipschitz bound), ties between the best lower bound
and another upper bound, and the pool's charge where the step is exact."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from exact import flat_rationals as _flat
from exact import rationals
from piecewise_checks import box_points, check_backward, exact_of
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.rules import LayerInput, rule_for
from certnet.errors import UnsupportedLayerError

F64, F32 = torch.float64, torch.float32


def _exact_leaky(a: float, h: Fraction) -> Fraction:
    return h if h > 0 else Fraction(a) * h


# -- LeakyReLU -------------------------------------------------------------------------------
def test_leaky_relu_unstable_neurons_are_those_with_lo_below_zero_below_hi():
    """CROWN tightens exactly the neurons whose interval straddles 0 (ends at 0 are stable;
    small positive his are not)."""
    m = nn.LeakyReLU(0.1)
    lo = torch.tensor([[-1.0, 0.0, 0.5, -1.0, -1.0, -2.0, 1.0, -0.5]], dtype=F64)
    hi = torch.tensor([[0.5, 1.0, 2.0, 0.0, 2.0, -1.0, 2.0, 0.25]], dtype=F64)
    want = [True, False, False, False, True, False, False, True]
    assert rule_for(m).unstable(m, lo, hi)[0].tolist() == want


def test_a_zero_slope_rigorous_interval_is_not_widened():
    """a = 0: the products are exact zeros, so the rigorous interval is relu of the ends."""
    m = nn.LeakyReLU(0.0)
    lo = torch.tensor([[-1.0, -3 * 2.0**-1074, 0.0, 0.5, -2.0]], dtype=F64)
    hi = torch.tensor([[-0.5, 2.0**-1074, 1.0, 0.75, 3.0]], dtype=F64)
    out_lo, out_hi = layer_interval(m, LayerInput(lo, hi, lo), rigorous=True)
    assert torch.equal(out_lo, lo.clamp(min=0)) and torch.equal(out_hi, hi.clamp(min=0))


@pytest.mark.parametrize("a", [0.1, 0.3, 0.7])
def test_a_float32_rigorous_interval_holds_the_exact_and_float_outputs(a):
    """float32 ends: the widening is float32's (float64's gamma would miss the float32
    rounding of a lo)."""
    m = nn.LeakyReLU(a)
    g = torch.Generator().manual_seed(3)
    lo = -(torch.rand(1, 64, generator=g, dtype=F64) * 4 + 0.25).to(F32)
    hi = lo.clone()
    out_lo, out_hi = layer_interval(m, LayerInput(lo, hi, lo), rigorous=True)
    with torch.no_grad():
        f32, f64 = m(lo), m(lo.double())
    for low, high, h, v32, v64 in zip(_flat(out_lo), _flat(out_hi), _flat(lo), _flat(f32),
                                      _flat(f64), strict=True):
        for v in (_exact_leaky(a, h), v32, v64):
            assert low <= v <= high


@pytest.mark.parametrize("a", [0.0, 0.01, 0.5])
def test_the_drift_covers_a_move_of_the_whole_error(a):
    """h = max(lo, 0) in the box and the float input h' = h + e, both >= 0: the output moves
    by exactly e (no rounding to pay), so the drift is at least e."""
    m = nn.LeakyReLU(a)
    lo = torch.tensor([[0.0, -1.0, 0.0, -3.0]], dtype=F64)
    hi = torch.tensor([[1.0, 2.0, 0.0, 0.5]], dtype=F64)
    err = torch.tensor([[1.0, 0.75, 3.0, 2.0**-20]], dtype=F64)
    drift = rule_for(m).drift(m, err, LayerInput(lo, hi, lo))
    h = lo.clamp(min=0)
    moved = h + err  # exact here
    with torch.no_grad():
        out = m(moved)
    for h0, v, d in zip(_flat(h), _flat(out), _flat(drift), strict=True):
        assert abs(v - _exact_leaky(a, h0)) <= d


def test_the_drift_of_a_slope_near_one_covers_the_error_and_the_rounding():
    """a = 1 - 2^-52, h = 0, h' = -e: fl(a e) is a e rounded (up, for some e), nearly e; the
    drift must hold e and that rounding (not e less a multiple of u e)."""
    a = 1 - 2.0**-52
    m = nn.LeakyReLU(a)
    err = torch.tensor([[1 + k / 64 for k in range(64)]], dtype=F64)
    lo, hi = torch.zeros_like(err), torch.ones_like(err)
    drift = rule_for(m).drift(m, err, LayerInput(lo, hi, lo))
    with torch.no_grad():
        out = m(-err)
    for v, d in zip(_flat(out), _flat(drift), strict=True):
        assert abs(v) <= d


@pytest.mark.parametrize("a", [0.1, 0.3])
def test_a_float32_drift_holds_the_float32_forward_pass(a):
    """Exact float32 inputs at the negative end of the box: the float32 forward pass rounds a
    h by float32's u, which the drift (in float32) must hold."""
    m = nn.LeakyReLU(a)
    g = torch.Generator().manual_seed(5)
    lo = -(torch.rand(1, 64, generator=g, dtype=F64) * 4 + 0.25).to(F32)
    drift = rule_for(m).drift(m, torch.zeros_like(lo), LayerInput(lo, lo, lo))
    with torch.no_grad():
        out = m(lo)
    for h, v, d in zip(_flat(lo), _flat(out), _flat(drift), strict=True):
        assert abs(v - _exact_leaky(a, h)) <= d


# -- MaxPool2d: refusals ---------------------------------------------------------------------
@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, ceil_mode=True),
                                  nn.MaxPool2d(2, return_indices=True)])
def test_the_pool_refusal_of_ceil_mode_and_indices_names_the_layer_and_settings(pool):
    with pytest.raises(UnsupportedLayerError, match=r"^layer 3: MaxPool2d bounds need "
                       r"return_indices=False and ceil_mode=False$"):
        rule_for(pool).check(pool, "layer 3")


def test_the_pool_refuses_padding_over_half_the_dilated_kernel():
    """torch's own limit: 2 p <= d (k - 1) + 1 (its forward pass refuses more)."""
    for pool in (nn.MaxPool2d(3, padding=1), nn.MaxPool2d(2, padding=1),
                 nn.MaxPool2d(3, padding=2, dilation=2), nn.MaxPool2d((3, 1), padding=(1, 0))):
        rule_for(pool).check(pool, "layer 3")
    for pool, message in ((nn.MaxPool2d(3, padding=2), r"\(2, 2\) over half the kernel "
                                                        r"\(3, 3\)"),
                          (nn.MaxPool2d(2, padding=2), r"\(2, 2\) over half the kernel "
                                                       r"\(2, 2\)"),
                          (nn.MaxPool2d((3, 2), padding=(1, 2)), r"\(1, 2\) over half the "
                                                                 r"kernel \(3, 2\)")):
        with pytest.raises(UnsupportedLayerError, match=r"^layer 3: MaxPool2d padding " +
                           message + "$"):
            rule_for(pool).check(pool, "layer 3")
        with pytest.raises(RuntimeError, match="pad should be"):
            pool(torch.zeros(1, 1, 8, 8))


def test_a_pool_input_without_four_axes_is_refused_with_its_shape():
    m = nn.MaxPool2d(2)
    lo = torch.zeros(1, 4, 4, dtype=F64)
    with pytest.raises(UnsupportedLayerError, match=r"^MaxPool2d bounds need \(batch, C, H, "
                       r"W\) inputs, got \(1, 4, 4\)$"):
        rule_for(m).unstable(m, lo, lo)


# -- MaxPool2d: geometry ---------------------------------------------------------------------
def _same_bounds(m: nn.MaxPool2d, ref: nn.MaxPool2d) -> None:
    """Every rule method gives the same values for m as for ref (the same pooling)."""
    g = torch.Generator().manual_seed(2)
    lo = torch.randn(2, 2, 7, 7, generator=g, dtype=F64)
    hi = lo + torch.rand(2, 2, 7, 7, generator=g, dtype=F64) * torch.randint(0, 2, (2, 2, 7, 7),
                                                                             generator=g)
    inp = LayerInput(lo, hi, lo)
    rule = rule_for(m)
    rule.check(m, "m")
    out = ref(lo)
    lam = torch.randn(2, 3, *out.shape[1:], generator=g, dtype=F64)
    with torch.no_grad():
        assert torch.equal(m(lo), out)
    for got, want in ((rule.interval(m, inp), rule.interval(ref, inp)),
                      (rule.backward(m, lam, inp, "adaptive"),
                       rule.backward(ref, lam, inp, "adaptive"))):
        assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))
    assert torch.equal(rule.unstable(m, lo, hi), rule.unstable(ref, lo, hi))
    assert torch.equal(rule.backward_error(m, inp), rule.backward_error(ref, inp))
    assert torch.equal(rule.drift(m, hi - lo, inp), rule.drift(ref, hi - lo, inp))
    assert rule.l2_lipschitz(m, inp) == rule.l2_lipschitz(ref, inp)


def test_one_element_kernel_and_stride_tuples_are_the_square_pool():
    """torch reads (k,) as (k, k)."""
    _same_bounds(nn.MaxPool2d((3,), stride=(2,)), nn.MaxPool2d(3, stride=2))


def test_an_empty_stride_is_the_kernel():
    """torch reads stride=[] as the kernel size."""
    m = nn.MaxPool2d(2, stride=[])
    assert m.stride == []
    _same_bounds(m, nn.MaxPool2d(2, stride=2))


@pytest.mark.parametrize(("kernel", "stride", "dilation"),
                         [(4, 2, 2), (3, 2, 3), (3, 1, 2), ((4, 3), (2, 1), (2, 2)),
                          (2, 2, 1), ((5, 2), (3, 1), (1, 3)), (6, 4, 2)])
def test_the_lipschitz_bound_is_the_root_of_the_most_windows_sharing_an_input(kernel, stride,
                                                                               dilation):
    """Brute force: the windows containing each input (folding unfolded ones). A unit bump
    at the most shared input moves every window's max by 1, so L >= sqrt(that count); and L
    is no more than that root rounded up."""
    m = nn.MaxPool2d(kernel, stride, dilation=dilation)
    size = 24
    ones = torch.ones(1, 1, size, size, dtype=F64)
    args = (m.kernel_size, m.dilation, 0, m.stride)
    count = F.fold(F.unfold(ones, *args), (size, size), *args)
    most = int(count.max())
    where = int(count.flatten().argmax())
    bump = torch.zeros(1, 1, size, size, dtype=F64)
    bump.view(-1)[where] = 1.0
    with torch.no_grad():
        moved = float((m(bump) ** 2).sum())  # |pool(bump) - pool(0)|^2, sums of ones: exact
    assert moved == most
    lip = rule_for(m).l2_lipschitz(m, LayerInput(ones, ones, ones))
    assert Fraction(lip) ** 2 >= most
    assert lip <= math.nextafter(math.sqrt(most), math.inf)


# -- MaxPool2d: backward steps ---------------------------------------------------------------
def test_a_tie_between_the_best_lower_bound_and_another_upper_bound_is_dominated():
    """l_j* = u_j: max(h_1, h_2) = h_1 on the whole box, so a negative lam goes on h_1 (exact)
    and not on the constant lam max u, and the window is stable."""
    m = nn.MaxPool2d((1, 2))
    lo = torch.tensor([[[[1.0, 0.0]]]], dtype=F64)
    hi = torch.tensor([[[[2.0, 1.0]]]], dtype=F64)
    inp = LayerInput(lo, hi, lo)
    rule = rule_for(m)
    assert not rule.unstable(m, lo, hi).any()
    lam = torch.tensor([-1.0], dtype=F64).view(1, 1, 1, 1, 1)
    coef, const = rule.backward(m, lam, inp, "adaptive")
    assert coef.flatten().tolist() == [-1.0, 0.0] and const.flatten().tolist() == [0.0]


def _check_step(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor, lam: torch.Tensor) -> None:
    inp = LayerInput(lo, hi, lo)
    found = [lo.double(), hi.double(), *box_points(lo.double(), hi.double(), 0)]
    exacts = [exact_of(m)(rationals(h[0])) for h in found]
    check_backward(m, lam, inp, found, exacts)


def test_a_float32_pool_backward_step_is_within_its_charge():
    """Undominated overlapping windows, negative lam: the constant is a float32 dot of 50
    terms, which float32's gamma (not float64's) covers."""
    m = nn.MaxPool2d(2, 1)
    g = torch.Generator().manual_seed(7)
    lo = (torch.rand(1, 2, 6, 6, generator=g, dtype=F64) * 3 + 0.1).to(F32)
    hi = (lo.double() + 1 + torch.rand(1, 2, 6, 6, generator=g, dtype=F64)).to(F32)
    lam = -(torch.rand(1, 6, 2, 5, 5, generator=g, dtype=F64) + 0.01).to(F32)
    _check_step(m, lo, hi, lam)


def test_a_single_input_window_step_is_exact_and_its_charge_is_not_negative():
    """k = 1 and two outputs: the step is exact (every window dominated); its charge must
    not go below 0 (a gamma of fewer than 0 roundings would)."""
    m = nn.MaxPool2d(1)
    lo = torch.tensor([[[[-3.0, 1.5]]]], dtype=F64)
    hi = torch.tensor([[[[-1.0, 2.5]]]], dtype=F64)
    inp = LayerInput(lo, hi, lo)
    assert (rule_for(m).backward_error(m, inp) >= 0).all()
    lam = torch.tensor([[[[[1.0, -3.0]]], [[[-0.5, 2.0]]]]], dtype=F64)
    _check_step(m, lo, hi, lam)


def test_a_pool_step_over_the_zero_box_has_a_non_negative_charge():
    """lo = hi = 0: the step is exact (0 = 0), and a charge below 0 (eta subtracted) would
    claim lam . z >= a positive number."""
    m = nn.MaxPool2d(2)
    lo = torch.zeros(1, 1, 4, 4, dtype=F64)
    g = torch.Generator().manual_seed(1)
    lam = torch.randn(1, 3, 1, 2, 2, generator=g, dtype=F64)
    assert (rule_for(m).backward_error(m, LayerInput(lo, lo, lo)) >= 0).all()
    _check_step(m, lo, lo.clone(), lam)


def test_the_pool_rule_runs_on_its_inputs_device():
    """Every index the rule builds lives on the inputs' device (meta here: no data; a CPU
    index would not mix with CUDA inputs either)."""
    m = nn.MaxPool2d(2, 1)
    lo = torch.zeros(1, 2, 4, 4, dtype=F64, device="meta")
    inp = LayerInput(lo, lo, lo)
    rule = rule_for(m)
    assert rule.unstable(m, lo, lo).device.type == "meta"
    lam = torch.zeros(1, 3, 2, 3, 3, dtype=F64, device="meta")
    coef, const = rule.backward(m, lam, inp, "adaptive")
    assert coef.device.type == "meta" and coef.shape == (1, 3, 2, 4, 4)
    assert const.shape == (1, 3)
