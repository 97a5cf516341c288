"""Tests written against the mutants of the bounds slices (``crown``: bounds/crown.py,
backward_rounding.py, alpha_crown.py; ``certifiers``) that survived ``scripts/mutation.sh``
(the list, with the mutant each test kills and the equivalent ones, is in
tests/mutation/survivors.md).

The soundness tests check whole bounds against sampled, attacked and exact values, where the
backward pass's rounding charges (~1e-13 of a bound) are swamped: these check the charges
themselves in exact arithmetic (the l1 norm of the coefficients rounded up, the largest rho
per point, a scalar rho, the settled slack of docs/rounding.md) and the refusal's message."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

from certnet.bounds import crown as crown_module
from certnet.bounds.backward_rounding import Rounding, l1_rows, largest, rule_rho
from certnet.bounds.crown import _propagate, crown_walk
from certnet.bounds.ibp import interval_walk, layer_interval
from certnet.bounds.rules import LayerInput
from certnet.bounds.rules.base import BoundRule
from certnet.errors import UnsupportedLayerError
from certnet.floats import gamma
from certnet.threat import ThreatModel


def _exact_l1(row: torch.Tensor) -> Fraction:
    return sum((abs(Fraction(float(v))) for v in row.flatten().tolist()), Fraction(0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_l1_rows_is_each_rows_norm_rounded_up_in_exact_arithmetic(dtype):
    """Kills the l2 norm, a norm over all rows (or all dims), and the rounding factor made
    smaller or taken in float64 for a float32 walk: terms far below the first one's ulp are
    lost by the float sum, and the bound must still hold them."""
    tiny = torch.finfo(dtype).eps / 4
    lam = torch.zeros(2, 3, 5, 64, dtype=dtype)
    lam[..., 0, 0] = 1.0
    lam[..., 1:, :] = tiny  # 319 terms each below half an ulp of the running sum
    lam[1, 2] *= -3.0
    got = l1_rows(lam)
    assert got.shape == (2, 3)
    for b in range(2):
        for s in range(3):
            assert Fraction(float(got[b, s])) >= _exact_l1(lam[b, s]), (dtype, b, s)
    # and not by much: each row's own norm, not one over the whole batch
    n = lam[0, 0].numel()
    assert Fraction(float(got[0, 0])) <= _exact_l1(lam[0, 0]) * (1 + 2 * Fraction(gamma(n, dtype)))


def test_largest_is_each_points_largest_rho():
    """Kills the maximum over every point (and the dims argument dropped), and the scalar
    and one-dimensional branches' shapes."""
    rho = torch.tensor([[1.0, 5.0], [7.0, 2.0], [0.5, 0.25]], dtype=torch.float64)
    assert torch.equal(largest(rho), torch.tensor([[5.0], [7.0], [0.5]], dtype=torch.float64))
    assert torch.equal(largest(rho.view(3, 1, 2)), largest(rho))
    assert torch.equal(largest(torch.tensor(3.0)), torch.tensor([[3.0]]))
    assert torch.equal(largest(torch.tensor([2.0, 9.0])), torch.tensor([[9.0]]))
    assert largest(0.25) == 0.25


def _inp(batch: int = 2, width: int = 4) -> LayerInput:
    lo = -torch.ones(batch, width, dtype=torch.float64)
    return LayerInput(lo, -lo, torch.zeros_like(lo))


def test_a_scalar_rho_is_charged_and_a_zero_one_is_not():
    """Kills the charge skipped for a non-zero float rho (``and rho`` for ``and not rho``)."""
    lam = torch.full((2, 3, 4), 0.5, dtype=torch.float64)
    charged, free = Rounding(lam[:, :, 0]), Rounding(lam[:, :, 0])
    charged.charge(lam, 0.25, _inp())
    free.charge(lam, 0.0, _inp())
    difference = charged.error - free.error
    assert (difference >= 2.0 * 0.25).all()  # ||lam||_1 = 2 per row
    assert (difference <= 2.0 * 0.25 * (1 + 1e-12)).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_settle_subtracts_the_slack_of_docs_rounding(dtype):
    """Kills the step and term counts started at other values, and every change to the
    settled slack E (1 + 2 gamma_{T+L+2}) + gamma_{L+6} (|base| + sum |c| + E), L steps, T
    terms, gamma in the walk's dtype (the same operations, so the same floats)."""
    base = torch.tensor([[3.0]], dtype=dtype)
    const = torch.tensor([[-1.0]], dtype=dtype)
    r = Rounding(base)
    assert (r.steps, r.terms) == (0, 1)
    r.constant(const)
    assert torch.equal(r.settle(base, const), base + const - gamma(6, dtype) * (3.0 + 1.0))
    inp = LayerInput(*(torch.zeros(1, 3, dtype=dtype),) * 3)  # no underflow reach beyond 1
    r.charge_sum(torch.tensor([[0.5]], dtype=dtype), 7, inp)
    e = r.error * (1 + 2 * gamma(7 + 1 + 2, dtype))
    slack = e + gamma(1 + 6, dtype) * (base.abs() + 1.0 + e)
    assert torch.equal(r.settle(base, const), base + const - slack)


class _NoBackwardError(BoundRule):
    pass


class Widget(nn.Module):
    pass


def test_a_rule_without_a_backward_error_is_refused_by_name():
    """Kills the message's layer name and words."""
    with pytest.raises(UnsupportedLayerError,
                       match="^Widget: no bound on the rounding of its backward relaxation$"):
        rule_rho(_NoBackwardError(), Widget(), _inp())


def test_a_rule_without_a_drift_or_an_interval_error_is_refused_by_name(monkeypatch):
    """Kills the messages' layer name and words (ibp.layer_drift, ibp._rigorous_interval),
    and a clean pass whose drift is unknown is infinite (no ball trusted), not an error."""
    from certnet.bounds.ibp import _clean_drift, _rigorous_interval, layer_drift

    class NoRounding(BoundRule):
        def interval(self, m, inp):
            return inp.lo, inp.hi

    monkeypatch.setattr("certnet.bounds.ibp.rule_for", lambda m: NoRounding())
    with pytest.raises(UnsupportedLayerError,
                       match="^Widget: no bound on the rounding of its forward pass$"):
        layer_drift(Widget(), torch.zeros(1, 3, dtype=torch.float64), _inp())
    with pytest.raises(UnsupportedLayerError,
                       match="^Widget: no bound on its interval's rounding$"):
        _rigorous_interval(NoRounding(), Widget(), _inp())
    clean = torch.zeros(1, 3, dtype=torch.float64)
    out = torch.ones(1, 2, dtype=torch.float64)
    moved = _clean_drift(NoRounding(), Widget(), clean, clean, out)
    assert moved.shape == out.shape and moved.dtype == out.dtype and moved.isinf().all() \
        and (moved > 0).all()


def test_every_charged_step_is_counted_and_underflow_charged_as_stated():
    """Kills the step count set instead of incremented, and the underflow charge made smaller
    (or larger): each step adds (terms + 16) eta (n max|h| + 1) per point, n the input's
    size (docs/rounding.md)."""
    r = Rounding(torch.zeros(2, 1, dtype=torch.float64))
    inp = LayerInput(torch.tensor([[-3.0, 1.0, 0.0], [0.5, 0.25, 2.0]], dtype=torch.float64),
                     torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 2.0]], dtype=torch.float64),
                     torch.zeros(2, 3, dtype=torch.float64))
    r.charge_sum(0.0, 5, inp)
    r.charge_sum(0.0, 5, inp)
    assert r.steps == 2 and r.terms == 5
    eta = torch.finfo(torch.float64).smallest_normal * torch.finfo(torch.float64).eps
    for b, top in enumerate((3.0, 2.0)):
        assert float(r.error[b, 0]) == 2 * ((5 + 16) * eta * (top * 3 + 1))


def test_propagate_intersects_with_each_rigorous_interval_after_the_tightened_layer():
    """Kills ``_propagate`` walking from layer 0 or only up to ``start``, and its intervals
    taken without their rounding widening in a rigorous walk: after it, each interval past
    ``start`` is exactly its old one intersected with the (rigorous) interval of the layer
    below."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                        nn.Linear(5, 2)).double()
    x = torch.rand(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for rigorous in (True, False):
            seen, _ = interval_walk(net, x, ThreatModel("linf", 0.3), rigorous=rigorous)
            # tighten layer 1's input, as a CROWN pass would
            old = list(seen)
            mid = (seen[1].lo + seen[1].hi) / 2
            seen[1] = LayerInput(seen[1].lo, torch.maximum(mid, seen[1].lo), seen[1].clean)
            _propagate(net, seen, 1, len(net), rigorous)
            assert seen[0] is old[0] and seen[1].hi is not old[1].hi
            for j in range(1, len(net)):
                lo, hi = layer_interval(net[j], seen[j], rigorous)
                assert torch.equal(seen[j + 1].lo, torch.maximum(lo, old[j + 1].lo))
                assert torch.equal(seen[j + 1].hi, torch.minimum(hi, old[j + 1].hi))
            assert (seen[-1].hi < old[-1].hi).any()  # the tightening reached the output


@pytest.mark.parametrize("slope", ["adaptive", "zero", "one", "same"])
def test_patches_mode_gives_the_dense_bounds_for_every_slope(monkeypatch, slope):
    """Kills the slope not passed on to the patches pass: CROWN behind convolutions runs on
    patches (``patch_plan``); with the plan refused it runs on full maps, with the same
    bounds."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3),
                        nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    threat = ThreatModel("linf", 0.05)
    with torch.no_grad():
        assert crown_module.patch_plan(net, interval_walk(net, x, threat)[0], threat, 3)
        patched, _ = crown_walk(net, x, threat, slope)
        monkeypatch.setattr(crown_module, "patch_plan", lambda *args: None)
        dense, _ = crown_walk(net, x, threat, slope)
    for a, b in zip(patched, dense, strict=True):
        assert torch.allclose(a.lo, b.lo, rtol=0, atol=1e-10)
        assert torch.allclose(a.hi, b.hi, rtol=0, atol=1e-10)


@pytest.mark.parametrize("conv", [True, False])
def test_rigorous_neuron_bounds_charge_their_rounding_on_patches_and_on_maps(conv):
    """Kills ``rigorous`` not passed on to the patches pass (or shifted into the chunk size):
    the rigorous bounds of a layer's neurons lie strictly outside the plain ones (every step
    is charged), behind convolutions (patches) as on dense layers."""
    from certnet.bounds.crown import _neuron_bounds

    torch.manual_seed(6)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3),
                            nn.ReLU()).double()
        x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU()).double()
        x = torch.rand(2, 6, dtype=torch.float64)
    threat = ThreatModel("linf", 0.05)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat, rigorous=True)
        assert (crown_module.patch_plan(net, seen, threat, 3) is not None) == conv
        rows = torch.arange(seen[3].lo[0].numel())
        plain = _neuron_bounds(net, seen, x, threat, "adaptive", 3, rows, rigorous=False)
        rigorous = _neuron_bounds(net, seen, x, threat, "adaptive", 3, rows, rigorous=True)
    assert (rigorous[0] < plain[0]).all() and (rigorous[1] > plain[1]).all()


def _alpha_case(seed: int):
    """A small dense ReLU net, two points, their full CROWN intervals and margin rows:
    (net, x, threat, seen, spec)."""
    from certnet.bounds.margins import margin_spec

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double()
    x, threat = torch.rand(2, 6, dtype=torch.float64), ThreatModel("linf", 0.3)
    with torch.no_grad():
        seen, _ = crown_walk(net, x, threat)
    return net, x, threat, seen, margin_spec(torch.tensor([0, 1]), 3).double()


def test_alpha_crown_starts_from_adaptive_slopes_by_default():
    """Kills optimized_bound's default slope changed: called without one, it is the
    optimisation from CROWN's adaptive slopes."""
    from certnet.bounds.alpha_crown import optimized_bound

    net, x, threat, seen, spec = _alpha_case(8)
    default = optimized_bound(net, seen, spec, x, threat, steps=3)
    assert torch.equal(default, optimized_bound(net, seen, spec, x, threat, "adaptive",
                                                steps=3))
    assert not torch.equal(default, optimized_bound(net, seen, spec, x, threat, "same",
                                                    steps=3))


def test_full_crown_selects_rows_of_each_layer_on_its_own_input(monkeypatch):
    """Kills the first step's ``output_rows`` handed another layer's interval: every call
    gets the selected layer's input (a dense layer refuses, and the step falls back to
    one-hot rows, on any input that is not its flat (B, in_features) one)."""
    from certnet.bounds.rules.affine import LinearRule

    torch.manual_seed(9)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10),
                        nn.ReLU(), nn.Linear(10, 3)).double()
    x = torch.rand(2, 1, 3, 4, dtype=torch.float64)
    seen_by = []
    rows_of = LinearRule.output_rows

    def spy(self, m, rows, inp):
        seen_by.append((m.in_features, tuple(inp.lo.shape)))
        return rows_of(self, m, rows, inp)
    monkeypatch.setattr(LinearRule, "output_rows", spy)
    with torch.no_grad():  # (l2: the first layer's neurons get a pass too, see test_crown_
        crown_walk(net, x, ThreatModel("l2", 0.5), rigorous=True)  # shortcuts' range test)
    assert {features for features, _ in seen_by} == {12, 16}
    assert all(shape == (2, features) for features, shape in seen_by)


def test_full_crowns_neuron_bounds_follow_the_slope():
    """Kills the slope dropped from (or replaced in) the neuron bounds' backward passes: the
    intervals full CROWN tightens depend on the lower slope chosen, and the fixed choices
    differ."""
    torch.manual_seed(10)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                        nn.Linear(12, 3)).double()
    x, threat = torch.rand(3, 6, dtype=torch.float64), ThreatModel("linf", 0.4)
    walks = {}
    with torch.no_grad():
        for slope in ("adaptive", "zero", "one", "same"):
            walks[slope] = crown_walk(net, x, threat, slope)[0][3]
    for a in walks:
        for b in walks:
            if a < b:
                assert not (torch.equal(walks[a].lo, walks[b].lo) and
                            torch.equal(walks[a].hi, walks[b].hi)), (a, b)


@pytest.mark.parametrize("slope", ["adaptive", "zero", "one", "same"])
def test_alpha_crown_without_steps_is_crown_at_the_given_slopes(slope):
    """Kills the slope dropped from alpha-CROWN's starting bound: with no steps it is CROWN's
    bound at the slopes asked for (and never below it with steps)."""
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.crown import backward_bound

    net, x, threat, seen, spec = _alpha_case(11)
    with torch.no_grad():
        crown = backward_bound(net, seen, spec, x, threat, slope)
    assert torch.equal(optimized_bound(net, seen, spec, x, threat, slope, steps=0), crown)
    assert (optimized_bound(net, seen, spec, x, threat, slope, steps=3) >= crown).all()
    # rigorous: CROWN's rigorous bound at those slopes (kills the plain one, or another
    # slope, or no rigour, in the rigorous start)
    with torch.no_grad():
        seen, _ = crown_walk(net, x, threat, rigorous=True)
        rigorous = backward_bound(net, seen, spec, x, threat, slope, rigorous=True)
        plain = backward_bound(net, seen, spec, x, threat, slope)
    assert (rigorous < plain).all()
    assert torch.equal(optimized_bound(net, seen, spec, x, threat, slope, steps=0,
                                       rigorous=True), rigorous)


def _slopes_seen(monkeypatch) -> list[dict]:
    """The alphas of every pass alpha-CROWN's optimisation runs (copies)."""
    from certnet.bounds import alpha_crown

    calls = []
    bound = alpha_crown.backward_bound

    def spy(*args, alphas=None, **kwargs):
        if alphas is not None:
            calls.append({i: a.detach().clone() for i, a in alphas.items()})
        return bound(*args, alphas=alphas, **kwargs)
    monkeypatch.setattr(alpha_crown, "backward_bound", spy)
    return calls


@pytest.mark.parametrize("slope", ["adaptive", "zero", "same"])
def test_alpha_crown_starts_from_each_rules_slopes_on_every_layer(monkeypatch, slope):
    """Kills the starting slopes taken with another choice, or without the layer or its
    interval, and the activation on the input (index 0) left out: the first optimised pass
    runs at every activation's ``slopes(m, seen[i], slope)``, one copy per row."""
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.margins import margin_spec
    from certnet.bounds.rules import rule_for

    torch.manual_seed(13)
    net = nn.Sequential(nn.ReLU(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, threat = torch.rand(2, 6, dtype=torch.float64) - 0.5, ThreatModel("linf", 0.3)
    with torch.no_grad():
        seen, _ = crown_walk(net, x, threat)
    spec = margin_spec(torch.tensor([0, 1]), 3).double()
    calls = _slopes_seen(monkeypatch)
    optimized_bound(net, seen, spec, x, threat, slope, steps=2)
    first = calls[0]
    assert sorted(first) == [0, 2]
    for i, alpha in first.items():
        start = rule_for(net[i]).slopes(net[i], seen[i], slope)
        assert torch.equal(alpha, start.unsqueeze(1).expand_as(alpha))


def test_one_step_of_alpha_crown_moves_the_slopes_and_tightens():
    """Kills the optimisation skipped for one step (``steps > 1``): one Adam step already
    raises some row above CROWN's bound, and the second pass runs at moved slopes."""
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.crown import backward_bound

    net, x, threat, seen, spec = _alpha_case(8)
    with torch.no_grad():
        crown = backward_bound(net, seen, spec, x, threat)
    one = optimized_bound(net, seen, spec, x, threat, steps=1)
    assert (one >= crown).all() and (one > crown).any()


def test_alpha_crown_runs_on_a_graphs_steps():
    """Kills the starting slopes asked of a rule without its layer: a graph step's rule reads
    its step (the slot its activation sits on)."""
    import certnet
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.crown import backward_bound
    from certnet.bounds.margins import margin_spec

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.head(torch.relu(h + self.b(h)))
    torch.manual_seed(14)
    net = certnet.bounded(Net().double(), (4,)).layers
    x, threat = torch.rand(2, 4, dtype=torch.float64), ThreatModel("linf", 0.3)
    with torch.no_grad():
        seen, _ = crown_walk(net, x, threat)
        spec = margin_spec(torch.tensor([0, 1]), 3).double()
        crown = backward_bound(net, seen, spec, x, threat)
    assert (optimized_bound(net, seen, spec, x, threat, steps=3) >= crown).all()


def test_alpha_crown_moves_its_slopes_at_the_learning_rate_given():
    """Kills Adam's learning rate left at its default: at lr 0 the slopes never move, and the
    bound is CROWN's bit for bit, whatever the steps."""
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.crown import backward_bound

    net, x, threat, seen, spec = _alpha_case(8)
    with torch.no_grad():
        crown = backward_bound(net, seen, spec, x, threat)
    assert torch.equal(optimized_bound(net, seen, spec, x, threat, steps=4, lr=0.0), crown)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_drift_is_the_documented_formula(dtype):
    """margins._minus_drift: lower - (|spec| . drift) (1 + gamma_{K+2}) in the bound's dtype,
    then one step down (docs/rounding.md); kills changed sums, factors and directions."""
    from certnet.bounds.margins import _minus_drift
    from certnet.floats import gamma

    generator = torch.Generator().manual_seed(9)
    # K = 6 outputs: 1 + gamma_8 is a float apart from 1 + gamma_6 and 1 + gamma_9 in both
    # dtypes (1 + gamma_n rounds to 1 + ceil(n / 2) ulps); drifts as large as the bounds, so
    # the factor shows in the difference
    lower = 8 * torch.randn(3, 4, generator=generator, dtype=torch.float64).to(dtype)
    spec = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64).to(dtype)
    drift = torch.rand(3, 6, generator=generator, dtype=torch.float64).to(dtype)
    spread = (spec.abs() * drift.unsqueeze(1)).sum(2) * (1 + gamma(8, dtype))
    want = torch.nextafter(lower - spread, torch.full_like(lower, -torch.inf))
    assert torch.equal(_minus_drift(lower, spec, drift), want)
    assert (want < lower - spread).all()


def test_a_float32_box_is_rounded_outward_in_a_rigorous_walk():
    """interval_walk(rigorous=True) starts from the threat's enclosure: in float32, x - eps
    and x + eps round to nearest (possibly inside the real set); the enclosure contains the
    exact ends, the plain box does not always (so the check can fail)."""
    from fractions import Fraction

    from certnet.bounds.ibp import interval_walk
    from certnet.threat import ThreatModel

    x = torch.rand(1, 64, generator=torch.Generator().manual_seed(10)) * 0.5 + 0.25
    threat = ThreatModel("linf", 0.1)
    net = nn.Sequential(nn.Flatten())
    rigorous = interval_walk(net, x, threat, rigorous=True)[0][0]
    plain = interval_walk(net, x, threat)[0][0]
    inside = 0
    for i, v in enumerate(x[0].tolist()):
        lo, hi = Fraction(v) - Fraction(0.1), Fraction(v) + Fraction(0.1)
        assert Fraction(float(rigorous.lo[0, i])) <= lo and Fraction(float(rigorous.hi[0, i])) >= hi
        inside += Fraction(float(plain.lo[0, i])) > lo or Fraction(float(plain.hi[0, i])) < hi
    assert inside


def test_a_rigorous_walk_convolves_by_gemm_in_either_dtype(monkeypatch):
    """A rigorous walk (float64, or its box in float32) runs its convolutions with oneDNN off
    (im2col + GEMM, a dot product per output, whose rounding the bounds cover; oneDNN may use
    Winograd); a plain walk leaves the backend as it was."""
    import copy

    from certnet.bounds.rules.affine import ConvRule

    seen = []
    apply = ConvRule.apply

    def spy(self, m, h, weight, bias):
        seen.append(torch.backends.mkldnn.enabled)
        return apply(self, m, h, weight, bias)
    monkeypatch.setattr(ConvRule, "apply", spy)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten()).double()
    x, threat = torch.rand(1, 1, 5, 5, dtype=torch.float64), ThreatModel("linf", 0.1)
    assert torch.backends.mkldnn.enabled
    with torch.no_grad():
        interval_walk(net, x, threat, rigorous=True)
        interval_walk(net, x, threat, box_layers=copy.deepcopy(net).float())
        rigorous = list(seen)
        seen.clear()
        interval_walk(net, x, threat)
    assert rigorous and not any(rigorous)
    assert seen and all(seen)


def _long_sum_net() -> tuple[nn.Sequential, Fraction]:
    """x -> 4096 outputs w_j x (w_j = 1 - k_j 2^-52, x = 1), specification: their sum. The
    backward pass sums 4096 coefficients in float (rounding up to 2e-10 here), while the
    forward pass rounds each output once (drift 3e-12 in all): the drift subtracted at the
    end cannot pay for the backward pass's own rounding. Returns the net and the exact sum."""
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(1, 4096, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(1 - torch.randint(0, 2 ** 10, (4096, 1), generator=g).double()
                            * 2.0 ** -52)
    exact = sum((Fraction(w) for w in linear.weight.flatten().tolist()), Fraction(0))
    return nn.Sequential(linear), exact


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_the_final_pass_charges_its_own_rounding_beyond_the_drift(method):
    from certnet.bounds.crown import backward_bound
    from certnet.bounds.ibp import drift_walk
    from certnet.bounds.margins import _minus_drift, spec_bounds
    from certnet.threat import BoxThreat

    net, exact = _long_sum_net()
    x = torch.ones(1, 1, dtype=torch.float64)
    threat = BoxThreat.of(x[0], x[0])
    spec = torch.ones(1, 1, 4096, dtype=torch.float64)
    with torch.no_grad():
        bound = spec_bounds(net, x, threat, spec, method, rigorous=True)
        assert Fraction(float(bound)) <= exact
        # non-vacuity: the same pass uncharged, less the drift, claims more than the exact sum
        seen, _ = interval_walk(net, x, threat, rigorous=True)
        plain = backward_bound(net, seen, spec, x, threat)
        assert Fraction(float(_minus_drift(plain, spec, drift_walk(net, seen)[-1]))) > exact


def test_alpha_crown_keeps_the_slope_choice_of_layers_it_does_not_optimise():
    """A MinMax layer has no optimisable slopes: alpha-CROWN's passes relax it with the
    caller's slope choice. With a zero learning rate every pass is CROWN's own, so the result
    is CROWN's bound bit for bit; the upper line's slope on MinMax (the choice None) would be
    tighter on some rows here, and show."""
    from certnet.bounds.alpha_crown import optimized_bound
    from certnet.bounds.crown import backward_bound
    from certnet.bounds.rules import rule_for
    from certnet.nn.activations import MinMax

    torch.manual_seed(35)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), MinMax(),
                        nn.Linear(8, 3)).double().eval()
    x, threat = torch.rand(2, 4, dtype=torch.float64), ThreatModel("linf", 0.3)
    spec = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        seen, _ = crown_walk(net, x, threat)
        crown = backward_bound(net, seen, spec, x, threat, "adaptive")
        start = rule_for(net[1]).slopes(net[1], seen[1], "adaptive").unsqueeze(1)
        other = backward_bound(net, seen, spec, x, threat, None,
                               alphas={1: start.expand(-1, 4, -1)})
    assert (other > crown + 1e-9).any()  # the case this is about
    optimised = optimized_bound(net, seen, spec, x, threat, "adaptive", steps=1, lr=0.0)
    assert torch.equal(optimised, crown)


def test_a_plain_ball_reach_is_the_radius_times_the_row_norms():
    from certnet.bounds.ibp import _ball
    from certnet.bounds.rules.affine import LinearRule

    layer = nn.Linear(5, 3).double()
    inp = LayerInput(*(torch.zeros(1, 5, dtype=torch.float64),) * 3)
    with torch.no_grad():
        reach = _ball(LinearRule(), layer, inp, 0.37, rigorous=False)
        assert torch.equal(reach, 0.37 * layer.weight.norm(dim=1))


def test_a_float32_box_pass_is_offered_where_every_interval_bounds_its_rounding():
    """Dense layers (their fan-in known) and exact ones (ReLU, Flatten) may run the box in
    float32; a per-channel affine map (Normalize: no fan-in, its weights rounded) may not."""
    from certnet.bounds.ibp import supports_low_precision
    from certnet.nn.lipschitz import Normalize

    dense = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert supports_low_precision(dense)
    assert not supports_low_precision(nn.Sequential(Normalize([0.5], [0.25]), *dense))


def test_every_pass_of_the_margin_and_training_bounds_takes_the_slope_given(monkeypatch):
    """The caller's slope rule reaches every backward pass of margin_bounds, training_bounds
    and fused_training_loss (CROWN's adaptive rule where none is given)."""
    import inspect

    from certnet.bounds import margins

    seen = []
    for name in ("backward_bound", "backward_bounds"):
        original = getattr(margins, name)

        def spy(*args, original=original, **kwargs):
            bound = inspect.signature(original).bind(*args, **kwargs)
            bound.apply_defaults()
            seen.append(bound.arguments["slope"])
            return original(*args, **kwargs)
        monkeypatch.setattr(margins, name, spy)
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, threat = torch.rand(2, 3, dtype=torch.float64), ThreatModel("linf", 0.3)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        for slope in ("zero", "one"):
            seen.clear()
            margins.margin_bounds(net, x, threat, y, "crown", slope)
            margins.training_bounds(net, x, threat, y, 0.5, slope)
            margins.fused_training_loss(net, x, threat, y, 0.5, slope)
            assert seen and set(seen) == {slope}
        seen.clear()
        margins.fused_training_loss(net, x, threat, y, 0.5)
        margins.training_bounds(net, x, threat, y, 0.5)
        assert seen and set(seen) == {"adaptive"}


def test_a_drift_walk_starts_at_the_input_by_default():
    from certnet.bounds.ibp import drift_walk

    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, threat = torch.rand(2, 3, dtype=torch.float64), ThreatModel("linf", 0.1)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat, rigorous=True)
        drifts = drift_walk(net, seen)
    assert len(drifts) == len(net) + 1 and not drifts[0].any() and drifts[1].gt(0).all()
    assert all(torch.equal(a, b) for a, b in zip(drifts, drift_walk(net, seen, 0), strict=True))
