"""Sigmoid, tanh, erf, GELU and SiLU (issue 27; certnet.bounds.rules.smooth): the constants the
relaxations rest on checked in high precision, the tangent / chord / mean-value lines against
the exact function (mpmath at 200 bits, the lines in exact rational arithmetic) on adversarial
intervals, the interval and drift against torch's forward pass, every bound method against
samples and PGD, and the importers (torch.fx functions, ONNX Sigmoid / Erf / Gelu and the
exported GELU and SiLU patterns) against torch and onnxruntime."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certnet
from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules import rule_for
from certnet.bounds.rules.base import LayerInput
from certnet.bounds.rules.smooth import ERF, GELU, SIGMOID, SILU, TANH
from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.falsify import falsify
from certnet.graph.onnx_import import load_onnx
from certnet.nn.smooth import Erf
from certnet.threat import ThreatModel

pytestmark = pytest.mark.usefixtures("single_thread")
mp = mpmath.mp


def _exact(name: str, x: mpmath.mpf) -> mpmath.mpf:
    return {"Sigmoid": lambda v: 1 / (1 + mpmath.exp(-v)), "Tanh": mpmath.tanh,
            "Erf": mpmath.erf, "GELU": lambda v: v * (1 + mpmath.erf(v / mpmath.sqrt(2))) / 2,
            "SiLU": lambda v: v / (1 + mpmath.exp(-v))}[name](x)


def _gelu_slope(x):
    return (1 + mpmath.erf(x / mpmath.sqrt(2))) / 2 + x * mpmath.npdf(x)


def _silu_slope(x):
    s = 1 / (1 + mpmath.exp(-x))
    return s * (1 + x * (1 - s))


SLOPES = {"GELU": _gelu_slope, "SiLU": _silu_slope}
ACTIVATIONS = {"Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "Erf": Erf(), "GELU": nn.GELU(),
               "SiLU": nn.SiLU()}


@pytest.mark.parametrize("name, fn, guesses", [("GELU", GELU, (-0.75, 1.41)),
                                               ("SiLU", SILU, (-1.28, 2.4))])
def test_the_constants_hold_in_high_precision(name, fn, guesses):
    slope = SLOPES[name]
    with mpmath.workdps(50):
        root = mpmath.findroot(slope, guesses[0])  # the function's minimum
        (a, b, value), = fn.value_minima
        assert a < root < b and value < _exact(name, root) and fn.range[0] <= value
        inflection = mpmath.findroot(lambda x: mpmath.diff(slope, x), guesses[1])
        (a, b, least), = fn.slope_minima
        assert a < -inflection < b and least < slope(-inflection)
        assert [w[0] < p < w[1] for w, p in zip(fn.inflections, (-inflection, inflection),
                                                strict=True)] == [True, True]
        # f' is largest at the right inflection and tends to 1 above; smallest at the left
        assert slope(inflection) < fn.lipschitz and -slope(-inflection) < fn.lipschitz
        for k, x in enumerate((-inflection - 1, 0, inflection + 1)):  # each piece's curvature
            assert (mpmath.diff(slope, x) > 0) == ((k % 2 == 0) == fn.convex_first)


def test_the_other_constants_hold_in_high_precision():
    with mpmath.workdps(50):
        assert 2 / mpmath.sqrt(mpmath.pi) < ERF.lipschitz and 1.2 > 2 / mpmath.sqrt(mpmath.pi)
        assert SIGMOID.lipschitz == 0.25 and TANH.lipschitz == 1.0


def _intervals(seed: int) -> list[tuple[float, float]]:
    """Intervals where the lines' rounding matters: every scale of width (down to a few
    ulps), every magnitude (subnormal to 1e300), and around the inflections and minima."""
    rng = np.random.default_rng(seed)
    out = []
    for centre in [0.0, -0.7517915, -1.4142135623730951, 1.4142135623730951, 1e-300, -3.0,
                   5e-324, 40.0, -40.0, 1e300, -1e300, *rng.normal(0, 3, 12)]:
        for width in (0.0, 1e-15, 1e-9, 1e-3, 0.3, 2.0, 20.0):
            lo = float(centre) - width * float(rng.random())
            hi = lo + width * max(1.0, abs(lo)) * float(rng.random())
            out.append((lo, hi))
            out.append((lo, np.nextafter(lo, math.inf)))
    return out


def _assert_between_lines(lines: tuple[float, float, float, float], x: float,
                          exact: mpmath.mpf, i: int) -> None:
    """s x + b <= f(x) <= t x + c, the lines in exact rationals, f(x) in 200 bits."""
    s, b, t, c = (Fraction(v) for v in lines)
    low, high = s * Fraction(x) + b, t * Fraction(x) + c
    assert mpmath.mpf(low.numerator) / low.denominator <= exact, (i, x)
    assert mpmath.mpf(high.numerator) / high.denominator >= exact, (i, x)


def _as_columns(intervals: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = zip(*intervals, strict=True)
    return (torch.tensor(lo, dtype=torch.float64).view(-1, 1),
            torch.tensor(hi, dtype=torch.float64).view(-1, 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_lines_hold_exactly_on_adversarial_intervals(name, dtype):
    """s x + b <= f(x) <= t x + c at the ends and interior floats of each interval, with f
    in 200-bit arithmetic and the lines in exact rationals; in float32 walks too (training
    bounds), whose unit roundoff every charge must use."""
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    lo, hi = _as_columns(_intervals(0))
    lo, hi = lo.to(dtype), hi.to(dtype)
    keep = (lo.isfinite() & hi.isfinite()).view(-1)  # 1e300 overflows float32
    lo, hi = lo[keep], hi[keep]
    s, b, t, c = (v.view(-1).tolist() for v in rule.lines(act, LayerInput(lo, hi, lo)))
    grid = torch.linspace(0, 1, 9, dtype=dtype)
    points = (lo + (hi - lo) * grid).clamp(lo, hi)
    with mpmath.workprec(200):
        for i, row in enumerate(points.tolist()):
            for x in row:
                exact = _exact(name, mpmath.mpf(x))
                _assert_between_lines((s[i], b[i], t[i], c[i]), x, exact, i)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_interval_and_drift_cover_the_exact_and_the_float_forward(name):
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    lo, hi = _as_columns(_intervals(1))
    inp = LayerInput(lo, hi, lo)
    low, high = rule.interval(act, inp)
    err = rule.interval_error(act, inp)
    low, high = (low - err).view(-1).tolist(), (high + err).view(-1).tolist()
    error = (hi - lo).abs().clamp(max=1.0) * 1e-3  # the inputs' own float error
    drift = rule.drift(act, error, inp).view(-1).tolist()
    points = (lo + (hi - lo) * torch.linspace(0, 1, 7, dtype=torch.float64)).clamp(lo, hi)
    moved = (points + error).clamp(lo - error, hi + error)
    floats, moved_floats = act(points).tolist(), act(moved).tolist()
    with mpmath.workprec(200):
        for i, row in enumerate(points.tolist()):
            for x, fx, fy in zip(row, floats[i], moved_floats[i], strict=True):
                exact = _exact(name, mpmath.mpf(x))
                assert low[i] <= exact <= high[i] and low[i] <= fx <= high[i], (i, x)
                assert abs(mpmath.mpf(fy) - exact) <= drift[i], (i, x)


def _net(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 12), act, nn.Linear(12, 12), act, nn.Linear(12, 3)).double()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_method_holds_against_samples_and_pgd(name):
    net = _net(ACTIVATIONS[name])
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, dtype=torch.float64, generator=generator)
    spec = torch.randn(3, 2, 3, dtype=torch.float64, generator=generator)
    for eps in (0.0, 0.05, 0.4):
        noise = torch.rand(500, 3, 4, dtype=torch.float64, generator=generator) * 2 - 1
        with torch.no_grad():
            outs = net((x + eps * noise).clamp(0, 1).flatten(0, 1)).view(500, 3, 3)
        values = torch.einsum("nbk,bsk->nbs", outs, spec).amin(0)
        for p in range(3):  # PGD on each point's first row
            lo, hi = (x[p:p + 1] - eps).clamp(0, 1), (x[p:p + 1] + eps).clamp(0, 1)
            _, best = falsify(net, lo, hi, lambda z, p=p: z @ spec[p, 0])
            values[p, 0] = min(float(values[p, 0]), best)
        bounds = {}
        for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
            for rigorous in (False, True):
                bound = spec_bounds(net, x, ThreatModel("linf", eps), spec, method,
                                    rigorous=rigorous)
                slack = 0 if rigorous else 1e-9 * (1 + values.abs())  # plain: rounding
                assert (bound <= values + slack).all(), (method, rigorous, eps)
                bounds[method, rigorous] = bound
        if eps == 0:
            with torch.no_grad():
                exact = torch.einsum("bk,bsk->bs", net(x), spec)
            assert (bounds["crown", True] >= exact - 1e-8).all()
        else:  # the relaxation gains over intervals
            assert (bounds["crown", True] > bounds["ibp", True]).all()


def test_the_gelu_tanh_approximation_is_refused():
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 2))
    with pytest.raises((UnsupportedLayerError, ConfigError), match=r"approximate='tanh'\) is "
                       r"not bounded; only the exact form x Phi\(x\)"):
        certnet.bounded(net, (3,)).certify(torch.rand(1, 3), 0.1, "crown", "linf")


class _Functions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        h = torch.sigmoid(h) + F.gelu(h) + torch.erf(h) + h.tanh() + F.silu(h)
        return self.b(torch.special.expit(h))


def test_fx_reads_the_smooth_functions_and_certifies_soundly():
    model = _Functions().double().eval()
    bounded = certnet.bounded(model, (3,))
    kinds = [type(node.op).__name__ for node in bounded.graph.nodes]
    assert {"Sigmoid", "GELU", "Erf", "Tanh", "SiLU"} <= set(kinds)
    x = torch.rand(4, 3, dtype=torch.float64)
    assert torch.equal(bounded.graph(x), model(x))
    cert = bounded.certify(x, 0.01, "crown", "linf")
    for i in range(4):  # a certified point's prediction survives PGD on every other class
        if not cert.certified[i]:
            continue
        lo, hi = (x[i:i + 1] - 0.01).clamp(0, 1), (x[i:i + 1] + 0.01).clamp(0, 1)
        pred = int(cert.pred[i])
        _, best = falsify(model, lo, hi, lambda z, p=pred: z[:, p] - z[:, 1 - p])
        assert best > 0


@pytest.mark.parametrize("opset", [17, 20])
def test_onnx_gelu_sigmoid_and_erf_match_onnxruntime(tmp_path, opset):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 4), nn.Sigmoid(),
                          nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(1, 3),), str(path), dynamo=False,
                      opset_version=opset, input_names=["x"], dynamic_axes={"x": {0: "N"}})
    graph = load_onnx(path)
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Linear", "GELU", "Linear", "Sigmoid", "Linear", "SiLU", "Linear"]
    x = np.random.default_rng(0).random((6, 3), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ours = graph(torch.from_numpy(x).double()).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-5
    # Erf as its own node, and Gelu(approximate="tanh") refused
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    for op, kwargs, fine in (("Erf", {}, True), ("Gelu", {"approximate": "tanh"}, False)):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node(op, ["h"], ["y"],
                                                                                   **kwargs)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, ["N", 3])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["N", 3])], [w])
        onnx_path = tmp_path / f"{op}.onnx"
        import onnx

        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]),
                  onnx_path)
        if fine:
            ours = load_onnx(onnx_path)(torch.from_numpy(x).double()).detach().numpy()
            ref = ort.InferenceSession(str(onnx_path)).run(None, {"x": x})[0]
            assert np.abs(ours - ref).max() <= 1e-6
        else:
            with pytest.raises(UnsupportedLayerError, match="approximate='tanh'"):
                load_onnx(onnx_path)


def _skewed(act: nn.Module, share: float) -> nn.Module:
    """``act`` with its float forward moved by ``share`` of the error the rule allows for it,
    up or down by the last bit of x: as bad a libm as the rounding charges admit (with the
    true few-ulp error of torch's own evaluation on top, inside the rest)."""
    rule = rule_for(act)

    class Skewed(nn.Module):
        def forward(self, x):
            sign = 1 - 2 * (x.view(torch.int64) & 1).to(x.dtype)
            return act(x) + share * sign * rule.error(x.abs())
    return Skewed()


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_rounding_charges_hold_for_the_worst_libm_they_admit(name):
    """Lines, interval and drift stay sound when torch's f is off by 70% of the error they
    charge for it, in either direction (the other 30% cover torch's real error)."""
    act = ACTIVATIONS[name]
    rule, skewed = rule_for(act), _skewed(act, 0.7)
    lo, hi = _as_columns(_intervals(2))
    inp = LayerInput(lo, hi, lo)
    s, b, t, c = (v.view(-1).tolist() for v in rule.lines(skewed, inp))
    low, high = rule.interval(skewed, inp)
    err = rule.interval_error(skewed, inp)
    low, high = (low - err).view(-1).tolist(), (high + err).view(-1).tolist()
    points = (lo + (hi - lo) * torch.linspace(0, 1, 7, dtype=torch.float64)).clamp(lo, hi)
    floats = skewed(points).tolist()
    # drift: a float input off by as much as its own magnitude, through the skewed forward
    error = lo.abs().maximum(hi.abs()).clamp(max=1.0)
    drift = rule.drift(skewed, error, inp).view(-1).tolist()
    moved = skewed(points + error).tolist()
    with mpmath.workprec(200):
        for i, row in enumerate(points.tolist()):
            for x, fx, fy in zip(row, floats[i], moved[i], strict=True):
                if math.isfinite(fy):
                    assert abs(mpmath.mpf(fy) - _exact(name, mpmath.mpf(x))) <= drift[i], (i, x)
                exact = _exact(name, mpmath.mpf(x))
                _assert_between_lines((s[i], b[i], t[i], c[i]), x, exact, i)
                assert low[i] <= exact <= high[i] and low[i] <= fx <= high[i], (i, x)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_torch_is_well_inside_the_error_the_rules_charge(name):
    """The charges assume torch's f within 16 ulps of its size and its derivative within
    64 u: measured against 200-bit values, torch uses at most a quarter of each."""
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    x = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64),
                   torch.logspace(-300, 2, 200, dtype=torch.float64),
                   -torch.logspace(-300, 2, 200, dtype=torch.float64)])
    values, slopes = act(x).tolist(), rule.fn.derivative(x).tolist()
    allowed = rule.error(x.abs()).tolist()
    u = 2.0 ** -53
    with mpmath.workprec(200):
        for xi, fx, dx, e in zip(x.tolist(), values, slopes, allowed, strict=True):
            v = mpmath.mpf(xi)
            assert abs(mpmath.mpf(fx) - _exact(name, v)) <= e / 4, xi
            exact_slope = SLOPES[name](v) if name in SLOPES else \
                mpmath.diff(lambda z: _exact(name, z), v)
            assert abs(mpmath.mpf(dx) - exact_slope) <= 16 * u, xi


def _window_intervals(name: str) -> list[tuple[float, float]]:
    """Intervals that end inside each window (an inflection, an interior minimum of f or f'),
    start inside it, or span it: where a containment test off by one comparison would put
    the point on the wrong side."""
    fn = rule_for(ACTIVATIONS[name]).fn
    windows = [*fn.inflections, *[(a, b) for a, b, _ in fn.value_minima],
               *[(a, b) for a, b, _ in fn.slope_minima]]
    out = []
    for a, b in windows:
        mid = (a + b) / 2
        out += [(a - 1.0, mid), (mid, b + 1.0), (a - 1e-3, b + 1e-3), (a, b), (a - 2.0, a),
                (b, b + 2.0), (mid, mid)]
    return out


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_lines_and_interval_hold_at_the_windows_and_at_infinite_ends(name):
    """Around every window, and on intervals with infinite ends (where torch's f may be NaN,
    as GELU's at -inf): finite lines, exactly below / above f, and an interval holding f."""
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    big = [(-math.inf, -1.0), (-math.inf, 2.0), (1.0, math.inf), (-math.inf, math.inf),
           (-3.0, math.inf)]
    lo, hi = _as_columns(_window_intervals(name) + big)
    inp = LayerInput(lo, hi, lo)
    lines = rule.lines(act, inp)
    assert all(v.isfinite().all() for v in lines)
    s, b, t, c = (v.view(-1).tolist() for v in lines)
    low, high = rule.interval(act, inp)
    err = rule.interval_error(act, inp)
    low, high = (low - err).view(-1).tolist(), (high + err).view(-1).tolist()
    plain_low, plain_high = (v.view(-1).tolist() for v in rule.interval(act, inp))
    finite_lo, finite_hi = lo.clamp(min=-50.0), hi.clamp(max=50.0)
    grid = finite_lo + (finite_hi - finite_lo) * torch.linspace(0, 1, 41, dtype=torch.float64)
    # the exact points the windows hold (nearest floats), where the interval meets them
    special = torch.tensor(_critical_points(name), dtype=torch.float64).view(1, -1)
    inside = (special >= finite_lo) & (special <= finite_hi)
    points = torch.cat([grid, torch.where(inside, special, finite_lo)], 1)
    with mpmath.workprec(200):
        for i, row in enumerate(points.tolist()):
            for x in row:
                exact = _exact(name, mpmath.mpf(x))
                _assert_between_lines((s[i], b[i], t[i], c[i]), x, exact, i)
                assert low[i] <= exact <= high[i], (i, x)
                # unwidened (plain bounds): within rounding of f, NaN ends never a bound
                assert plain_low[i] <= exact + 1e-12 and plain_high[i] >= exact - 1e-12, (i, x)


def _critical_points(name: str) -> list[float]:
    """The inflections and the interior minima of f and f' (for the monotone ones: the
    inflection 0), to double precision."""
    if name not in SLOPES:
        return [0.0]
    slope = SLOPES[name]
    guesses = {"GELU": (-0.75, 1.41), "SiLU": (-1.28, 2.4)}[name]
    with mpmath.workdps(30):
        root = mpmath.findroot(slope, guesses[0])
        inflection = mpmath.findroot(lambda x: mpmath.diff(slope, x), guesses[1])
    return [float(root), float(-inflection), float(inflection)]


@pytest.mark.parametrize("name, convex, concave, mixed", [
    ("Sigmoid", (-3.0, -1.0), (0.5, 2.0), (-1.0, 1.5)),
    ("Tanh", (-2.0, -0.5), (0.2, 1.0), (-0.5, 0.7)),
    ("Erf", (-2.0, -0.5), (0.2, 1.0), (-0.5, 0.7)),
    ("GELU", (-1.0, 1.0), (2.0, 3.0), (1.0, 2.0)),
    ("SiLU", (-2.0, 2.0), (-5.0, -3.0), (1.0, 3.0))])
def test_each_piece_gets_its_tangent_and_chord(name, convex, concave, mixed):
    """Convex piece: tangent at l below, chord above; concave: chord below, tangent at u
    above; across an inflection: both lines at the least slope on the interval."""
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    lo, hi = _as_columns([convex, concave, mixed])
    s, _, t, _ = (v.view(-1) for v in rule.lines(act, LayerInput(lo, hi, lo)))
    slope = rule.fn.derivative
    ends = lo.view(-1), hi.view(-1)
    chord = (act(ends[1]) - act(ends[0])) / (ends[1] - ends[0])
    grid = lo[2] + (hi[2] - lo[2]) * torch.linspace(0, 1, 10001, dtype=torch.float64)
    least = slope(grid).min()
    expected_s = torch.stack([slope(ends[0][0]), chord[1], least])
    expected_t = torch.stack([chord[0], slope(ends[1][1]), least])
    assert torch.allclose(s, expected_s, atol=1e-6) and (s <= expected_s).all()
    assert torch.allclose(t, expected_t, atol=1e-6) and (t <= expected_t).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_one_backward_step_is_within_its_rounding_charge(name, dtype):
    """lam . (the lines) in exact rationals against the float step's lam_h . h + const, for
    coefficients of every sign and size and inputs up to 1e8: the difference stays within
    sum |lam_j| rho_j (``backward_error``), in float64 and float32 walks."""
    act = ACTIVATIONS[name]
    rule = rule_for(act)
    generator = torch.Generator().manual_seed(5)
    n = 64
    lo = (torch.randn(1, n, dtype=torch.float64, generator=generator) *
          torch.logspace(-2, 8, n, dtype=torch.float64)).to(dtype)
    hi = lo + (torch.rand(1, n, dtype=torch.float64, generator=generator).to(dtype) *
               lo.abs().clamp(min=1))
    inp = LayerInput(lo, hi, lo)
    lam = (torch.randn(1, 3, n, dtype=torch.float64, generator=generator) *
           torch.logspace(-3, 3, n, dtype=torch.float64)).to(dtype)
    coef, const = rule.backward(act, lam, inp, "adaptive")
    rho = rule.backward_error(act, inp).view(-1).tolist()
    s, b, t, c = (v.view(-1).tolist() for v in rule.lines(act, inp))
    h = (lo + (hi - lo) * torch.rand(1, n, dtype=torch.float64, generator=generator).to(dtype))
    h = h.clamp(lo, hi)
    for row in range(3):
        exact = Fraction(0)
        computed = Fraction(const[0, row].item())
        charge = Fraction(0)
        for j in range(n):
            lj, hj = Fraction(lam[0, row, j].item()), Fraction(h[0, j].item())
            slope, intercept = (s[j], b[j]) if lj >= 0 else (t[j], c[j])
            exact += lj * (Fraction(slope) * hj + Fraction(intercept))
            computed += Fraction(coef[0, row, j].item()) * hj
            charge += abs(lj) * Fraction(rho[j])
        assert abs(computed - exact) <= charge, (row, float(computed - exact), float(charge))


def test_verify_decides_robustness_of_an_onnx_gelu_sigmoid_net(tmp_path):
    """certnet.bounded(ONNX).verify: a small ball holds; a ball around a point labelled with
    a class the net does not predict is violated, by an input whose float64 outputs replay."""
    from certnet.properties.robustness import linf_robustness

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.Sigmoid(),
                          nn.Linear(8, 3)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(1, 4),), str(path), dynamo=False, opset_version=17)
    net = certnet.bounded(path)
    x = torch.rand(4, dtype=torch.float64)
    with torch.no_grad():
        scores = net.graph(x.view(1, 4))[0]
    label, other = int(scores.argmax()), int(scores.argmin())
    holds = net.verify(linf_robustness(x, 1e-4, label, 3))
    assert holds.status == "holds"
    violated = net.verify(linf_robustness(x, 1e-4, other, 3))
    assert violated.status == "violated"
    with torch.no_grad():
        replay = net.graph(violated.x.view(1, 4).double())[0]
    rivals = torch.cat([replay[:other], replay[other + 1:]])
    assert torch.equal(replay, violated.y.view(-1)) and rivals.max() >= replay[other]


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_l2_balls_through_smooth_activations_hold(name):
    """In l2 the interval walk also carries each layer's ball (radius times the activation's
    Lipschitz bound): every method's bound stays below samples of the l2 ball."""
    net = _net(ACTIVATIONS[name])
    generator = torch.Generator().manual_seed(7)
    x = 0.25 + 0.5 * torch.rand(2, 4, dtype=torch.float64, generator=generator)
    spec = torch.randn(2, 2, 3, dtype=torch.float64, generator=generator)
    eps = 0.2
    direction = torch.randn(4000, 2, 4, dtype=torch.float64, generator=generator)
    radius = eps * torch.rand(4000, 2, 1, dtype=torch.float64, generator=generator) ** 0.25
    points = (x + direction / direction.norm(dim=2, keepdim=True) * radius).clamp(0, 1)
    with torch.no_grad():
        outs = net(points.flatten(0, 1)).view(4000, 2, 3)
    values = torch.einsum("nbk,bsk->nbs", outs, spec).amin(0)
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        for rigorous in (False, True):
            bound = spec_bounds(net, x, ThreatModel("l2", eps), spec, method,
                                rigorous=rigorous)
            slack = 0 if rigorous else 1e-9 * (1 + values.abs())
            assert (bound <= values + slack).all(), (method, rigorous)
