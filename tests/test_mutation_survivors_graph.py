"""Tests written against the mutants of the ``graph_step`` slice (``bounds/rules/graph_step.py``:
the rules of a lowered graph's steps and of its joins) that survived ``scripts/mutation.sh``
(the list, with the mutant each test kills and the equivalent ones, is the
``certnet.bounds.rules.graph_step`` section of tests/mutation/survivors.md).

tests/test_graph_bounds.py checks whole graphs (containment, CROWN within IBP, cancelling
biases in exact arithmetic), so these were open: the residual add's own rounding (drift and
interval, float32 too), the rounding of the coefficient sum at a fork, a concatenation's exact
interval, the refusals (an operator's own, its message, an operator without a rounding
bound), and what a step delegates to its operator (batch statistics, relaxability, boxes,
unstable neurons, optimisable slopes)."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
import torch
from exact import flat_rationals as _q
from torch import nn

from certnet.bounds.crown import backward_bound, crown_walk
from certnet.bounds.ibp import interval_walk, layer_interval
from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules import BoundRule, LayerInput, check_supported, rule_for
from certnet.bounds.rules.graph_step import AddRule
from certnet.errors import UnsupportedLayerError
from certnet.floats import gamma
from certnet.graph import INPUT, Graph, Node
from certnet.graph.lower import Step, lower
from certnet.graph.ops import Add, Concat
from certnet.nn.layer_types import BY_CLASS
from certnet.threat import ThreatModel

F64, F32 = torch.float64, torch.float32


def _box(lo: list[float], hi: list[float], dtype: torch.dtype = F64) -> LayerInput:
    lo_t, hi_t = torch.tensor([lo], dtype=dtype), torch.tensor([hi], dtype=dtype)
    return LayerInput(lo_t, hi_t, lo_t)


# -- the residual add's own rounding -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32])
def test_an_add_bounds_the_rounding_of_its_float_sum(dtype):
    """a + b with b below half an ulp of a: the float sum drops b. The interval's widening and
    the drift (exact inputs) must both cover it, in the walk's own dtype."""
    big = 2 / torch.finfo(dtype).eps  # 2^53 (float64), 2^24 (float32)
    a, b = _box([big], [big], dtype), _box([1.0], [1.0], dtype)
    exact = Fraction(big) + 1
    lo, hi = AddRule().interval(None, [a, b])
    error = AddRule().interval_error(None, [a, b])
    assert _q(lo - error)[0] <= exact <= _q(hi + error)[0]
    drift = AddRule().drift(None, [torch.zeros_like(a.lo)] * 2, [a, b])
    assert abs(_q(a.lo + b.lo)[0] - exact) <= _q(drift)[0]


def test_an_add_carries_each_input_error_whole():
    """Computed inputs a' = b' = 1/2 whose exact values are 3 and 1 below them: the float sum
    1 is 4 off the exact -3, and no rounding happens to absorb any of it."""
    a, b = _box([0.5], [0.5]), _box([0.5], [0.5])
    errors = [torch.tensor([[3.0]], dtype=F64), torch.tensor([[1.0]], dtype=F64)]
    drift = AddRule().drift(None, errors, [a, b])
    assert _q(drift)[0] >= abs(Fraction(1) - Fraction(-3))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_an_add_drift_rounds_the_sum_of_its_input_errors_up(dtype):
    """Errors 1 and eps/4, whose float sum is 1: the drift's factor on them (1 + gamma_4, in
    the walk's dtype) must lift the sum above the exact 1 + eps/4 (the boxes are 0: no other
    term is left to cover it)."""
    small = torch.finfo(dtype).eps / 4
    a, b = _box([0.0], [0.0], dtype), _box([0.0], [0.0], dtype)
    errors = [torch.tensor([[1.0]], dtype=dtype), torch.tensor([[small]], dtype=dtype)]
    assert float(errors[0] + errors[1]) == 1.0
    drift = AddRule().drift(None, errors, [a, b])
    assert _q(drift)[0] >= 1 + Fraction(small)


def test_an_add_charges_the_documented_roundings_and_no_more():
    """The bounds are the docstring's: 4 roundings of |a| + |b| (the interval), and the input
    errors grown by the same factor (the drift). A larger constant stays sound but gives
    away certificates."""
    a, b = _box([-3.0, 0.25], [2.0, 0.5]), _box([1.0, -8.0], [4.0, 1.0])
    g = gamma(4, F64)
    size = torch.maximum(a.lo.abs(), a.hi.abs()) + torch.maximum(b.lo.abs(), b.hi.abs())
    assert torch.equal(AddRule().interval_error(None, [a, b]), g * size)
    errors = [torch.tensor([[1e-9, 0.0]], dtype=F64), torch.tensor([[2e-9, 5e-9]], dtype=F64)]
    assert torch.equal(AddRule().drift(None, errors, [a, b]),
                       (errors[0] + errors[1]) * (1 + g) + g * size)


def test_a_concatenation_widens_nothing():
    """cat moves values: its rigorous interval is the plain one, with no widening."""
    step = Step(Concat(1), [(2,), (3,)], (0, 1), (), True, (5,))
    inp = _box([-1.0, 0.5, 2.0, -4.0, 1e16], [1.0, 0.75, 3.0, -2.0, 2e16])
    plain, rigorous = layer_interval(step, inp), layer_interval(step, inp, rigorous=True)
    assert torch.equal(plain[0], rigorous[0]) and torch.equal(plain[1], rigorous[1])


# -- the coefficient sum at a fork --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32])
def test_a_fork_charges_the_rounding_of_its_coefficient_sum(dtype):
    """x kept and read by a Linear of weight -d (d below half an ulp of 1): backward, x's
    coefficient 1 + (-d) rounds to 1, so lam . z >= lam_h . x + const claims x where the
    exact value is x (1 - d): only the fork's charge (gamma_2 |x| per unit of |lam_h|, in the
    step's dtype) makes it a lower bound."""
    d = torch.finfo(dtype).eps / 2 ** 8
    linear = nn.Linear(1, 1, bias=False).to(dtype)
    with torch.no_grad():
        linear.weight.fill_(-d)
    step = Step(linear, [(1,)], (0,), (0,), False, (1,))
    rule = rule_for(step)
    inp = _box([1.0], [2.0], dtype)
    lam = torch.ones(1, 1, 2, dtype=dtype)  # z = (x, -d x): lam . z = x (1 - d)
    lam_h, const = rule.backward(step, lam, inp, "adaptive")
    assert _q(lam_h)[0] == 1  # the sum rounded
    rho = torch.as_tensor(rule.backward_error(step, inp), dtype=dtype).expand(1, 2)
    fork = rule.sum_error(step, inp)
    assert fork is not None
    fork = torch.as_tensor(fork, dtype=dtype).expand(1, 1)
    charge = _q((lam.abs()[0] * rho).sum() + (lam_h.abs()[0] * fork).sum())[0]
    for x in (Fraction(1), Fraction(3, 2), Fraction(2)):
        exact = x * (1 - Fraction(d))
        claimed = _q(lam_h)[0] * x + _q(const)[0]
        assert claimed > exact  # the uncharged step is no bound
        assert claimed - charge <= exact


def test_a_fork_charges_two_roundings_of_the_inputs_and_no_more():
    step = Step(nn.ReLU(), [(2,)], (0,), (0,), False, (2,))
    inp = _box([-3.0, 0.5], [1.0, 4.0])
    assert torch.equal(rule_for(step).sum_error(step, inp), gamma(2, F64) * inp.magnitude)
    alone = Step(nn.ReLU(), [(2,)], (0,), (), True, (2,))
    assert rule_for(alone).sum_error(alone, inp) is None  # read once, kept nowhere


# -- refusals ------------------------------------------------------------------------------------
def _chain(op: nn.Module, width: int = 3) -> nn.Sequential:
    """x -> Linear -> op -> + Linear's output -> head, lowered to steps."""
    torch.manual_seed(0)
    nodes = [Node(nn.Linear(width, width), (INPUT,), "lin"), Node(op, (0,), "op"),
             Node(Add(), (1, 0), "res"), Node(nn.Linear(width, 2), (2,), "head")]
    return lower(Graph(nodes, (width,)).double().eval())


def test_an_operator_inside_a_step_gets_its_own_check_named():
    chain = _chain(nn.LeakyReLU(2.0))
    with pytest.raises(UnsupportedLayerError,
                       match=r"^layer 1 \(Step\), operator LeakyReLU: LeakyReLU bounds need"):
        check_supported(chain)


def test_a_three_way_sum_is_refused_with_the_whole_message():
    nodes = [Node(Add(), (INPUT, INPUT), "double"), Node(Add(), (0, INPUT), "plus"),
             Node(nn.Linear(2, 2).double(), (1,), "head")]
    chain = lower(Graph(nodes, (2,)))
    message = ("layer 0 (Step): a value read twice by Add and also used later; the rounding "
               "of a three-way sum of its coefficients is not bounded here")
    with pytest.raises(UnsupportedLayerError, match=f"^{re.escape(message)}$"):
        check_supported(chain)


class Shift(nn.Module):
    """x + 1/4, registered below with a rule that knows neither rounding bound (or, as
    ``ExactShift``, only its interval's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.25


class ExactShift(Shift):
    pass


class ShiftRule(BoundRule):
    def interval(self, m, inp):
        return inp.lo + 0.25, inp.hi + 0.25

    def backward(self, m, lam, inp, slope):
        return lam, 0.25 * lam.flatten(2).sum(2)


class ExactShiftRule(ShiftRule):
    exact_interval = True  # (not so in floating point; the test only needs the flag)


@pytest.fixture
def shift_rules():
    from certnet.bounds.rules import register_bound_rule

    register_bound_rule(Shift, ShiftRule())
    register_bound_rule(ExactShift, ExactShiftRule())
    yield
    for cls in (Shift, ExactShift):
        del BY_CLASS[cls]


def test_a_step_passes_on_an_operator_without_rounding_bounds(shift_rules):
    """A rule that knows no rounding bound: the rigorous walk names what is missing (the
    interval's, then the backward step's) rather than fail inside the step."""
    x, threat = torch.rand(2, 3, dtype=F64), ThreatModel("linf", 0.1)
    interval_walk(_chain(Shift()), x, threat)  # plain: fine
    with pytest.raises(UnsupportedLayerError, match="no bound on its interval's rounding"):
        interval_walk(_chain(Shift()), x, threat, rigorous=True)
    chain = _chain(ExactShift())
    seen, _ = interval_walk(chain, x, threat, rigorous=True)
    spec = torch.ones(2, 1, 2, dtype=F64)
    with pytest.raises(UnsupportedLayerError, match="no bound on the rounding of its backward"):
        backward_bound(chain, seen, spec, x, threat, rigorous=True)


# -- what a step delegates to its operator -------------------------------------------------------
def test_a_step_with_batch_statistics_reads_the_clean_batch_and_is_refused_by_crown():
    chain = _chain(nn.BatchNorm1d(3).double())
    chain.train()
    x, threat = torch.rand(4, 3, dtype=F64), ThreatModel("linf", 0.05)
    with torch.no_grad():
        seen, out = interval_walk(chain, x, threat)  # the BatchNorm reads the clean batch
        assert ((seen[-1].lo <= out) & (out <= seen[-1].hi)).all()
        with pytest.raises(UnsupportedLayerError, match="eval mode"):
            crown_walk(chain, x, threat)


def test_a_step_whose_operator_has_no_relaxation_ends_the_backward_pass():
    """An interval-only operator (no linear relaxation) inside a step: CROWN concretizes
    on its output interval instead of relaxing it."""
    from certnet.bounds.crown import relaxation_floor

    class Floor(nn.Module):
        def forward(self, x):
            return x.clamp(min=0.5)

    class FloorRule(BoundRule):
        relaxable = False
        exact_interval = True

        def interval(self, m, inp):
            return inp.lo.clamp(min=0.5), inp.hi.clamp(min=0.5)

    from certnet.bounds.rules import register_bound_rule

    register_bound_rule(Floor, FloorRule())
    try:
        chain = _chain(Floor())
        assert relaxation_floor(chain, len(chain)) == 2
        x, threat = torch.rand(2, 3, dtype=F64), ThreatModel("linf", 0.1)
        spec = torch.tensor([[[1.0, -1.0]]], dtype=F64).expand(2, 1, 2)
        with torch.no_grad():
            bound = spec_bounds(chain, x, threat, spec, "crown")
            points = x + 0.1 * (2 * torch.rand(200, 2, 3, dtype=F64) - 1)
            values = (chain(points.flatten(0, 1)).view(200, 2, 2) * spec[:, 0]).sum(2)
        assert (bound[:, 0] <= values.amin(0)).all()
    finally:
        del BY_CLASS[Floor]


class WideShift(Shift):
    pass


class WideShiftRule(ShiftRule):
    """Its interval's error is a Python float (a user's rule may return one)."""

    def interval_error(self, m, inp):
        return 0.7  # float32 would round it down: 0.699999988...


def test_a_float_error_widens_only_the_operators_result_in_the_walks_dtype():
    from certnet.bounds.rules import register_bound_rule

    register_bound_rule(WideShift, WideShiftRule())
    try:
        step = Step(WideShift(), [(2,)], (0,), (0,), False, (2,))
        inp = _box([-1.0, 0.5], [1.0, 0.75])
        lo, hi = layer_interval(step, inp, rigorous=True)
        assert torch.equal(lo[:, :2], inp.lo) and torch.equal(hi[:, :2], inp.hi)  # kept slot
        assert torch.equal(lo[:, 2:], inp.lo + 0.25 - 0.7)
        assert torch.equal(hi[:, 2:], inp.hi + 0.25 + 0.7)
    finally:
        del BY_CLASS[WideShift]


def test_a_single_row_is_selected_inside_a_step():
    """The first step back from one neuron selects its row of the operator's weights (as for
    many rows): that step then does not round."""
    linear = nn.Linear(3, 4).double()
    step = Step(linear, [(2,), (3,)], (1,), (0,), False, (4,))
    inp = _box([0.0] * 5, [1.0] * 5)
    for rows in (torch.tensor([3]), torch.tensor([2, 5])):
        selected = rule_for(step).output_rows(step, rows, inp)
        assert selected is not None
        a, b = selected
        assert torch.equal(a[:, 2:], linear.weight[rows - 2]) and not a[:, :2].any()
        assert torch.equal(b, linear.bias[rows - 2])


def test_a_reshaping_step_maps_boxes_to_boxes():
    step = Step(nn.Flatten(), [(2, 2)], (0,), (), True, (4,))
    assert rule_for(step).maps_boxes_to_boxes(step)
    join = Step(Add(), [(2,), (2,)], (0, 1), (), True, (2,))
    assert not rule_for(join).maps_boxes_to_boxes(join)


def _residual_relus(seed: int = 3) -> nn.Sequential:
    """Two residual blocks of dense layers and ReLUs, lowered to steps."""
    torch.manual_seed(seed)
    nodes = [Node(nn.Linear(4, 6), (INPUT,), "a"), Node(nn.ReLU(), (0,), "ra"),
             Node(nn.Linear(6, 6), (1,), "b"), Node(Add(), (2, 0), "res"),
             Node(nn.ReLU(), (3,), "rr"), Node(nn.Linear(6, 6), (4,), "c"),
             Node(nn.ReLU(), (5,), "rc"), Node(Add(), (6, 4), "res2"),
             Node(nn.Linear(6, 3), (7,), "head")]
    return lower(Graph(nodes, (4,)).double().eval())


def test_full_crown_tightens_the_unstable_neurons_of_a_step():
    chain = _residual_relus()
    x, threat = torch.rand(3, 4, dtype=F64), ThreatModel("linf", 0.3)
    with torch.no_grad():
        ibp, _ = interval_walk(chain, x, threat)
        crown, _ = crown_walk(chain, x, threat)
    relus = [i for i, m in enumerate(chain) if isinstance(m.op, nn.ReLU)]
    assert any((crown[i].lo > ibp[i].lo + 1e-9).any() or (crown[i].hi < ibp[i].hi - 1e-9).any()
               for i in relus)


def test_alpha_crown_optimises_the_slopes_of_a_step():
    chain = _residual_relus()
    x, threat = torch.rand(3, 4, dtype=F64), ThreatModel("linf", 0.3)
    spec = torch.randn(3, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        crown = spec_bounds(chain, x, threat, spec, "crown")
        alpha = spec_bounds(chain, x, threat, spec, "alpha-crown")
    assert (alpha >= crown).all() and (alpha > crown + 1e-9).any()
