"""Elementwise arithmetic with constants (issue 27, :class:`certnet.nn.scale.Scale`): torch.fx
reads ``x * c``, ``c * x``, ``x / c``, ``x + c``, ``x - c``, ``c - x`` with numbers, buffers and
parameters of any broadcastable shape, and ONNX reads ``Mul``/``Div``/``Add``/``Sub`` with
constants, computing exactly what the module (or onnxruntime, to float32) computes; certnet's
export writes them back. Bounds of every method contain sampled and attacked outputs, are
exact at radius 0 and lie below the MILP oracle; the rule's rounding charges hold in exact
rational arithmetic at adversarial magnitudes (1e300, 1e-300, subnormal products, sums that
round away their O(1) part), and so do whole networks' rigorous bounds."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact import exact_layer, rationals
from exact import flat_rationals as _flat
from graph_checks import agree_with_onnxruntime, attacked_minimum, save_onnx
from piecewise_checks import box_points
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules import LayerInput, rule_for
from certnet.errors import InputError, UnsupportedLayerError
from certnet.export import to_onnx
from certnet.falsify import falsify
from certnet.graph.fx_import import from_module
from certnet.graph.onnx_import import load_onnx
from certnet.nn.scale import Scale
from certnet.threat import ThreatModel
from certnet.verify.oracle import exact_min_margin

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
F64 = torch.float64


# -- exact arithmetic ------------------------------------------------------------------------
def exact_scale(m: Scale, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """z = v * w + b (v / w + b) in Fractions on one point of ``shape``."""
    like = (1, *shape)
    w = None if m.weight is None else rationals(torch.broadcast_to(m.weight.double(), like)[0])
    b = None if m.bias is None else rationals(torch.broadcast_to(m.bias.double(), like)[0])

    def apply(v: np.ndarray) -> np.ndarray:
        out = v if w is None else (v / w if m.divide else v * w)
        return out if b is None else out + b
    return apply


def exact_net(layers: nn.Sequential, shape: tuple[int, ...]) -> Callable[[torch.Tensor], list]:
    """The network in exact rational arithmetic at one float64 point (no batch axis)."""
    steps, x = [], torch.zeros(1, *shape, dtype=F64)
    for m in layers:
        steps.append(exact_scale(m, tuple(x.shape[1:])) if type(m) is Scale else exact_layer(m))
        with torch.no_grad():
            x = m(x)

    def run(point: torch.Tensor) -> list:
        v = rationals(point)
        for step in steps:
            v = step(v)
        return list(v.reshape(-1))
    return run


# -- torch.fx --------------------------------------------------------------------------------
class Arithmetic(nn.Module):
    """Every spelling: numbers first and last, buffers and parameters of several broadcast
    shapes, methods and functions, and a constant folded from a buffer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.register_buffer("per_channel", torch.randn(3, 1, 1, generator=g))
        self.register_buffer("full", torch.randn(1, 3, 4, 4, generator=g))
        self.register_buffer("divisor", torch.rand(3, 4, 4, generator=g) + 0.5)
        self.shift = nn.Parameter(torch.randn(4, generator=g))
        self.fc = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) * self.per_channel
        h = 0.5 * h + self.shift
        h = h / self.divisor - 0.25
        h = 1.5 - torch.relu(h)
        h = h.mul(self.full).div(3.0).sub(self.shift).add(2)
        h = torch.mul(h, 2) / 7
        return self.fc((-(h - self.full * 2)).flatten(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fx_reads_every_spelling_of_arithmetic_with_constants(dtype):
    torch.manual_seed(0)
    net = Arithmetic().to(dtype).eval()
    graph = from_module(net, (2, 4, 4))  # checks graph == module bit for bit
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Conv2d", "Scale", "Scale", "Scale", "Scale", "Scale", "ReLU", "Scale", "Scale",
        "Scale", "Scale", "Scale", "Scale", "Scale", "Scale", "Negate", "Flatten", "Linear"]
    divisions = [n.op for n in graph.nodes if type(n.op) is Scale and n.op.divide]
    assert len(divisions) == 3 and all(m.weight.dtype == dtype for m in divisions)
    x = torch.rand(7, 2, 4, 4, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(graph(x), net(x))


@pytest.mark.parametrize(("step", "error"), [
    (lambda h, c: h * torch.ones(2, 1, 5), "does not broadcast|shape"),
    (lambda h, c: h + c.batch, "batch"),
    (lambda h, c: h / 0.0, "division by zero"),
    (lambda h, c: torch.div(h, 2.0, rounding_mode="floor"), "rounding mode"),
    (lambda h, c: h * h, "two computed values"),
    (lambda h, c: 2.0 / h, "1 / x is not affine"),
    (lambda h, c: torch.add(h, 1.0, alpha=2), "alpha"),
])
def test_fx_refuses_what_is_not_elementwise_affine(step, error):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.register_buffer("batch", torch.ones(2, 5))  # EXAMPLE_BATCH rows

        def forward(self, x):
            return step(self.fc(x), self)

    with pytest.raises(UnsupportedLayerError, match=error) as info:
        from_module(Net().eval(), (5,))
    assert "fx node" in str(info.value)


# -- ONNX ------------------------------------------------------------------------------------
def _rand(*shape: int, seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, low + 1, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def test_onnx_reads_arithmetic_with_constants_and_keeps_its_normalisations(tmp_path):
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"]),  # per channel: Normalize
        helper.make_node("Div", ["a", "std"], ["b"]),  # folded into it
        helper.make_node("Mul", ["b", "full"], ["c"]),  # any shape: Scale
        helper.make_node("Add", ["c", "rows"], ["d"]),  # its shift: the same Scale
        helper.make_node("Relu", ["d"], ["e"]),
        helper.make_node("Div", ["e", "cols"], ["f"]),  # not per channel: a dividing Scale
        helper.make_node("Sub", ["half", "f"], ["g"]),  # c - x
        helper.make_node("Mul", ["two", "g"], ["h"]),  # c * x
        helper.make_node("Sub", ["h", "rows"], ["i"]),  # x - c, not per channel
        helper.make_node("Add", ["cols", "i"], ["j"]),  # c + x
        helper.make_node("Flatten", ["j"], ["k"]),
        helper.make_node("Gemm", ["k", "w"], ["l"], transB=1),
        helper.make_node("Div", ["l", "three"], ["m"]),  # on (batch, features)
        helper.make_node("Sub", ["m", "bias"], ["y"])]  # per feature: MeanShift
    inits = {"mean": _rand(1, 2, 1, 1), "std": _rand(1, 2, 1, 1, low=0.5),
             "full": _rand(2, 3, 3, seed=1), "rows": _rand(3, 1, seed=2),
             "cols": _rand(3, seed=3, low=0.5), "half": np.array(0.5, np.float32),
             "two": np.array([2.0], np.float32), "w": _rand(4, 18, seed=4),
             "three": np.array(3.0, np.float32), "bias": _rand(4, seed=5)}
    path = save_onnx(tmp_path, nodes, inits, ["N", 2, 3, 3], ["N", 4])
    graph = load_onnx(path)
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Normalize", "Scale", "ReLU", "Scale", "Scale", "Scale", "Scale", "Scale", "Flatten",
        "Linear", "Scale", "MeanShift"]
    assert graph.nodes[1].op.bias is not None and graph.nodes[3].op.divide
    agree_with_onnxruntime(path, graph)


@pytest.mark.parametrize("case, message", [
    ("product", "two computed values"),
    ("quotient", "divides by constants only"),
    ("zero", "no zero entry"),
    ("broadcast", "does not broadcast"),
])
def test_onnx_refuses_what_is_not_elementwise_affine(tmp_path, case, message):
    cases = {"product": ([helper.make_node("Mul", ["x", "x"], ["y"], name="n")], {}),
             "quotient": ([helper.make_node("Div", ["c", "x"], ["y"], name="n")],
                          {"c": np.array(1.0, np.float32)}),
             "zero": ([helper.make_node("Div", ["x", "c"], ["y"], name="n")],
                      {"c": np.array([1.0, 0.0, 2.0, 3.0], np.float32)}),
             "broadcast": ([helper.make_node("Mul", ["x", "c"], ["y"], name="n")],
                           {"c": np.ones((2, 1, 4), np.float32)})}
    nodes, inits = cases[case]
    path = save_onnx(tmp_path, nodes, inits, [1, 4], [1, 4])
    with pytest.raises((UnsupportedLayerError, InputError), match=message) as info:
        load_onnx(path)
    assert "ONNX node 'n'" in str(info.value)


def _head(layers: list[nn.Module]) -> nn.Sequential:
    g = torch.Generator().manual_seed(3)
    seq = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for m in seq:
            for t in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if isinstance(m, nn.Linear) and t is not None:
                    t.copy_(torch.randn(t.shape, generator=g, dtype=F64) * 0.7)
    return seq


def _rounded(t: torch.Tensor) -> torch.Tensor:
    return t.float().double()  # float32 values: export writes them exactly


def small_net() -> nn.Sequential:
    """(4,) -> Linear -> Scale (x * w + b) -> ReLU -> Scale (x / w) -> Scale (c - x) -> head."""
    g = torch.Generator().manual_seed(1)
    return _head([
        nn.Linear(4, 6), Scale(_rounded(torch.randn(6, generator=g, dtype=F64)),
                               _rounded(torch.randn(1, 6, generator=g, dtype=F64))),
        nn.ReLU(), Scale(_rounded(torch.rand(6, generator=g, dtype=F64) + 0.25), divide=True),
        Scale(-torch.ones((), dtype=F64), torch.tensor(0.5, dtype=F64)), nn.Linear(6, 3)])


def test_certnet_export_of_scales_comes_back(tmp_path):
    layers = small_net()
    path = tmp_path / "net.onnx"
    path.write_bytes(to_onnx(layers, (4,)).SerializeToString())
    graph = load_onnx(path)
    assert [type(n.op) for n in graph.nodes] == [type(m) for m in layers]
    x = torch.rand(5, 4, dtype=F64)
    with torch.no_grad():
        ours = graph(x)
        assert torch.equal(ours, graph.sequential()(x))
        scales = [m for m in layers if type(m) is Scale]
        assert all(torch.equal(n.op.weight.flatten(), m.weight.flatten()) for n, m in
                   zip([n for n in graph.nodes if type(n.op) is Scale], scales, strict=True))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": x.float().numpy()})[0]
    assert np.abs(ref - layers(x).detach().numpy()).max() <= 1e-5


def test_a_per_channel_division_with_a_shift_comes_back_as_one_scale(tmp_path):
    """Export writes Div then Add; the reader's Div per channel is a Normalize of mean 0,
    which the Add after it turns back into the one Scale ((x - 0) / s + c = x / s + c)."""
    layers = nn.Sequential(
        Scale(torch.tensor([[[2.0]], [[0.5]]], dtype=F64), torch.full((2, 3, 3), 0.25,
                                                                   dtype=F64), divide=True),
        nn.Flatten(), nn.Linear(18, 2).double()).eval()
    path = tmp_path / "div.onnx"
    path.write_bytes(to_onnx(layers, (2, 3, 3)).SerializeToString())
    graph = load_onnx(path)
    assert [type(n.op) for n in graph.nodes] == [Scale, nn.Flatten, nn.Linear]
    x = torch.rand(3, 2, 3, 3, dtype=F64)
    with torch.no_grad():
        assert torch.equal(graph.nodes[0].op(x), layers[0](x))


def test_constants_loaded_after_construction_are_checked():
    from certnet.bounds.rules import check_supported

    layer = Scale(torch.ones(3, dtype=F64), divide=True)
    with torch.no_grad():
        layer.weight[1] = 0.0
    with pytest.raises(UnsupportedLayerError, match="zero entry"):
        check_supported(nn.Sequential(layer))
    with torch.no_grad():
        layer.weight[1] = float("nan")
    with pytest.raises(UnsupportedLayerError, match="NaN"):
        check_supported(nn.Sequential(layer))


# -- bounds ----------------------------------------------------------------------------------
def test_bounds_contain_sampled_and_attacked_outputs_and_are_exact_at_zero():
    torch.manual_seed(0)
    chain = from_module(Arithmetic().double().eval(), (2, 4, 4)).chain()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 2, 4, 4, dtype=F64, generator=g)
    spec = torch.randn(2, 3, 3, dtype=F64, generator=g)
    eps = 0.02
    values = attacked_minimum(chain, x, eps, spec)
    for method in METHODS:
        for rigorous in (False, True):
            bound = spec_bounds(chain, x, ThreatModel("linf", eps), spec, method,
                                rigorous=rigorous).detach()
            assert (bound <= values).all(), (method, rigorous)
    with torch.no_grad():
        exact = torch.einsum("bk,bsk->bs", chain(x), spec)
    for method in METHODS:
        at_zero = spec_bounds(chain, x, ThreatModel("linf", 0.0), spec, method,
                              rigorous=True).detach()
        assert (at_zero <= exact).all() and torch.allclose(at_zero, exact, rtol=0, atol=1e-9)


def _margin_bound(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float,
                  method: str) -> float:
    classes = layers(x[None]).shape[1]
    rows = [j for j in range(classes) if j != label]
    spec = torch.zeros(1, len(rows), classes, dtype=F64)
    for r, j in enumerate(rows):
        spec[0, r, label], spec[0, r, j] = 1.0, -1.0
    return float(spec_bounds(layers, x[None], ThreatModel("linf", eps), spec, method,
                             rigorous=True).detach().min())


@pytest.mark.parametrize("seed", range(2))
def test_the_milp_oracle_lies_above_every_rigorous_bound(seed):
    layers = small_net()
    x = torch.rand(4, dtype=F64, generator=torch.Generator().manual_seed(seed))
    label = int(layers(x[None]).argmax())
    for eps in (0.02, 0.1):
        oracle = exact_min_margin(layers, x, label, eps, "linf")
        for method in METHODS:
            assert _margin_bound(layers, x, label, eps, method) <= oracle, (method, eps)


# -- rounding in exact arithmetic ------------------------------------------------------------
BIG, TINY = 1e300, 1e-300

#: (name, layer, one input's shape): adversarial magnitudes in weights, divisors and shifts
CASES = [
    ("mul", lambda: Scale(torch.tensor([BIG, -TINY, 3.0, -0.1, 2.0**-1074, 1.0], dtype=F64),
                          torch.tensor([-1e16, TINY, 0.5, 1e16, 0.0, -BIG], dtype=F64)), (6,)),
    ("div", lambda: Scale(torch.tensor([TINY, 3.0, -BIG, 7.0, -0.1, 2.0**-1000], dtype=F64),
                          torch.tensor([1e16, -0.1, 2.0**-1074, -1e16, 0.3, 0.0], dtype=F64),
                          divide=True), (6,)),
    ("broadcast", lambda: Scale(torch.tensor([[-3.0], [1e-200]], dtype=F64),
                                torch.tensor([1e16, -0.1], dtype=F64)), (2, 2)),
    ("shift", lambda: Scale(None, torch.tensor([1e16, -1e16, 0.1, TINY], dtype=F64)), (4,)),
    ("minus", lambda: Scale(-torch.ones((), dtype=F64), torch.tensor(1e16, dtype=F64)), (4,)),
    ("float32", lambda: Scale(torch.tensor([2.0**100, -0.1, 2.0**-140, 3.0]).float(),
                              torch.tensor([2.0**60, -1.0, 0.1, 2.0**-149]).float()), (4,)),
    ("float32-div", lambda: Scale(torch.tensor([2.0**-100, -0.1, 3.0, 7.0]).float(),
                                  torch.tensor([-2.0**40, 0.0, 0.3, 1.0]).float(), divide=True),
     (4,)),
]


def _box(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A box (1, *shape) of mixed signs and magnitudes 2^-60 .. 4, some ends equal."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp2(torch.empty(shape, dtype=F64).uniform_(-60, 2, generator=g))
    lo = (torch.rand(shape, generator=g, dtype=F64) - 0.5).sign() * size
    width = torch.rand(shape, generator=g, dtype=F64) * size * \
        torch.randint(0, 2, shape, generator=g)
    return lo.unsqueeze(0), (lo + width).unsqueeze(0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_the_rule_rounding_holds_in_exact_arithmetic(name, factory, shape, seed):
    """The rigorous interval (float64 and float32 walks) holds the exact and the float64
    outputs; a backward step with its charge is a valid lower bound; the drift bounds the
    float forward pass of inputs off by up to the given error."""
    m = factory().double()
    exact = exact_scale(m, shape)
    lo, hi = _box(shape, seed)
    inp = LayerInput(lo, hi, (lo + hi) / 2)
    points = box_points(lo, hi, seed + 1)
    rule = rule_for(m)
    with torch.no_grad():
        floats = [_flat(m(h)) for h in points]
    exacts = [list(exact(rationals(h[0])).reshape(-1)) for h in points]
    walks = [(m, inp)]
    if all(torch.equal(t.float().double(), t) for t in m.buffers()):  # a float32 walk too
        low32, high32 = lo.float(), hi.float()  # outward: float32 ends that contain the box
        low32 = torch.where(low32.double() > lo, low32.nextafter(low32.new_tensor(-np.inf)),
                            low32)
        high32 = torch.where(high32.double() < hi,
                             high32.nextafter(high32.new_tensor(np.inf)), high32)
        walks.append((copy.deepcopy(m).float(), LayerInput(low32, high32, low32)))
    for layer, box in walks:
        low, high = (_flat(t) for t in layer_interval(layer, box, rigorous=True))
        for values in [*floats, *exacts]:
            assert all(a <= v <= b for a, v, b in zip(low, values, high, strict=True)), \
                box.lo.dtype
    assert len(walks) == 2 or name not in ("float32", "float32-div")
    # backward
    g = torch.Generator().manual_seed(seed + 7)
    lam = torch.randn(1, 3, *shape, generator=g, dtype=F64) * \
        torch.exp2(torch.randint(-30, 30, (1, 3, *shape), generator=g)).double()
    rho = torch.as_tensor(rule.backward_error(m, inp), dtype=F64).expand(1, *shape)
    lam_h, const = rule.backward(m, lam, inp, "adaptive")
    charge = (lam.abs() * rho.unsqueeze(1)).flatten(2).sum(2)
    for h, z in zip(points, exacts, strict=True):
        hh = _flat(h)
        for r in range(3):
            left = sum(a * b for a, b in zip(_flat(lam[:, r]), z, strict=True))
            right = sum(a * b for a, b in zip(_flat(lam_h[:, r]), hh, strict=True)) + \
                Fraction(float(const[0, r]))
            assert left >= right - Fraction(float(charge[0, r]))
    # drift, with and without an input error
    error = torch.exp2(torch.empty(1, *shape, dtype=F64).uniform_(-60, -10, generator=g))
    for e in (torch.zeros_like(error), error):
        bound = _flat(rule.drift(m, e, inp).expand(1, *shape))
        for k, (h, z) in enumerate(zip(points, exacts, strict=True)):
            moved = h + e * (1 if k % 2 else -1)  # a float input within e of the exact h
            moved = torch.where((moved - h).abs() <= e, moved, h)
            with torch.no_grad():
                computed = _flat(m(moved))
            assert all(abs(c - v) <= b for c, v, b in zip(computed, z, bound, strict=True))


def test_the_plain_interval_misses_exact_outputs_that_rounding_moved():
    """Non-vacuity: without its widening, the float interval of x + 1e16 excludes exact
    outputs (the O(1) part of the sum is rounded away)."""
    m = Scale(None, torch.tensor([1e16] * 4, dtype=F64))
    lo = torch.tensor([[0.3, -0.7, 0.1, 1.25]], dtype=F64)
    low, high = (_flat(t) for t in layer_interval(m, LayerInput(lo, lo, lo)))
    value = exact_scale(m, (4,))(rationals(lo[0])).reshape(-1)
    assert not all(a <= v <= b for a, v, b in zip(low, value, high, strict=True))


def cancelling_net() -> nn.Sequential:
    """x -> Linear -> x * 1e300 (+ 1e284, whose sum rounds) -> ReLU -> x / 1e300 -> x * 1e-300
    -> x / 1e-300 + 1e16 -> 1e16 - x -> head: each layer's magnitudes alike (so no charge is
    inflated by another entry's), every product and quotient rounded, and the last two sums
    lose their O(1) parts to 1e16 in float64."""
    lin = nn.Linear(3, 4)
    head = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.7, -1.1],
                                       [-0.2, 0.1, 0.9], [1.5, 1.0, -0.6]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2, 0.05, -0.3]))
        head.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.25], [-0.5, 1.0, 1.0, -1.0],
                                        [0.3, 0.2, -0.7, 1.0]]))
        head.bias.zero_()
    def t(*values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=F64)

    return nn.Sequential(
        lin.double(), Scale(t(BIG, BIG, BIG, BIG), t(1e284, -1e284, 0.0, 1e299)), nn.ReLU(),
        Scale(t(BIG, -BIG, BIG, 3 * BIG), divide=True), Scale(t(TINY, TINY, -TINY, 3 * TINY)),
        Scale(t(TINY, TINY, TINY, -TINY), t(1e16, -1e16, 1e16, 0.5), divide=True),
        Scale(-t(1.0), t(1e16, -1e16, 1e16, 0.0)), head.double()).eval()


@pytest.mark.parametrize("method", METHODS)
def test_rigorous_bounds_hold_for_the_exact_and_the_float64_network(method):
    layers = cancelling_net()
    exact = exact_net(layers, (3,))
    x = torch.tensor([[0.25, 0.5, 0.75]], dtype=F64)
    eps = 0.125
    spec = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.5, 0.5]]], dtype=F64)
    bound = spec_bounds(layers, x, ThreatModel("linf", eps), spec, method, rigorous=True)
    bound = [Fraction(float(v)) for v in bound[0].detach()]
    rng = np.random.default_rng(0)
    points = [x[0] + eps * torch.tensor(c, dtype=F64)
              for c in itertools.product((-1.0, 1.0), repeat=3)]
    points += [x[0] + eps * torch.from_numpy(rng.uniform(-1, 1, 3)) for _ in range(20)]
    for s in range(3):
        found, _ = falsify(layers, x - eps, x + eps, lambda z, s=s: z @ spec[0, s], steps=20)
        points.append(found[0])
    rows = [[Fraction(float(v)) for v in row] for row in spec[0]]
    plain = []
    for p in points:
        with torch.no_grad():
            computed = _flat(layers(p[None].clamp(x - eps, x + eps)))
        z = exact(p.clamp(x[0] - eps, x[0] + eps))
        for r in range(3):
            for out in (z, computed):
                assert bound[r] <= sum(a * b for a, b in zip(rows[r], out, strict=True))
        plain.append(z != computed)
    assert any(plain)  # the float64 network is not the exact one here: rounding matters


def test_every_certifier_takes_scales_and_pads_and_no_certified_point_flips():
    """Lipschitz certifiers read Scale's and Pad's registered bounds (l2, l_inf, float64
    rounding) and rules (drift, float32 boxes); nothing certified flips under sampling or PGD."""
    import certnet
    from certnet.certifiers import CERTIFIERS
    from certnet.nn.lipschitz import LipschitzLinear
    from certnet.nn.pad import Pad

    g = torch.Generator().manual_seed(0)
    first, last = LipschitzLinear(8, 16).double(), LipschitzLinear(19, 4).double()
    with torch.no_grad():
        for t in (first.weight, first.bias, last.weight, last.bias):
            t.copy_(torch.randn(t.shape, generator=g, dtype=F64) * 0.5)
    seq = nn.Sequential(
        nn.Flatten(), Scale(torch.rand(8, generator=g, dtype=F64) + 0.5,
                            torch.randn(8, generator=g, dtype=F64) * 0.1), first, nn.ReLU(),
        Pad([1, 2], 0.3), Scale(torch.rand(19, generator=g, dtype=F64) + 1, divide=True),
        last).eval()
    model = certnet.bounded(seq, (2, 2, 2))
    x = torch.rand(6, 2, 2, 2, dtype=F64, generator=g)
    eps = 0.02
    for norm in ("linf", "l2"):
        for name in CERTIFIERS.names():
            cert = model.certify(x, eps, norm=norm, certifier=name)
            assert cert.certified.any() or name == "linf-lipschitz", (norm, name)
            for i in torch.nonzero(cert.certified).flatten().tolist():
                noise = torch.rand(200, 2, 2, 2, generator=g, dtype=F64) * 2 - 1
                if norm == "l2":
                    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                points = (x[i] + eps * noise).clamp(0, 1)
                pred = int(cert.pred[i])
                half = eps if norm == "linf" else eps / 8**0.5  # a box inside the ball
                lo, hi = (x[i:i + 1] - half).clamp(0, 1), (x[i:i + 1] + half).clamp(0, 1)
                found, _ = falsify(seq, lo, hi, lambda z, p=pred: z[:, p] - torch.cat(
                    [z[:, :p], z[:, p + 1:]], 1).amax(1), steps=10, restarts=2)
                with torch.no_grad():
                    assert (seq(torch.cat([points, found])).argmax(1) == pred).all(), (norm, name)


class Residual(nn.Module):
    """Scale and Pad inside branches: (fc(x) * w - 0.5) + x, a padded branch concatenated."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.fc, self.head = nn.Linear(3, 3), nn.Linear(7, 3)
        self.register_buffer("w", torch.randn(3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x) * self.w - 0.5 + x)
        return self.head(torch.cat([F.pad(h, (1, 0), value=0.25) / 3, x], 1))


def test_scales_and_pads_in_branches_bound_through_the_lowered_chain():
    torch.manual_seed(0)
    graph = from_module(Residual().double().eval(), (3,))
    assert {"Scale", "Pad", "Add", "Concat"} <= {type(n.op).__name__ for n in graph.nodes}
    chain = graph.chain()
    x = torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    spec = torch.randn(2, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    values = attacked_minimum(chain, x, 0.1, spec)
    for method in METHODS:
        for rigorous in (False, True):
            bound = spec_bounds(chain, x, ThreatModel("linf", 0.1), spec, method,
                                rigorous=rigorous).detach()
            assert (bound <= values + (0 if rigorous else 1e-12)).all(), (method, rigorous)
    label = int(chain(x[:1]).argmax())
    oracle = exact_min_margin(chain, x[0], label, 0.1, "linf")
    assert _margin_bound(chain, x[0], label, 0.1, "crown") <= oracle
