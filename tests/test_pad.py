"""Constant padding (issue 27, :class:`certnet.nn.pad.Pad`): torch.fx reads ``F.pad`` in
constant mode and keeps torch's ``ZeroPad2d`` / ``ConstantPad2d`` (1-d and 3-d too), ONNX
``Pad`` in constant mode (pads and value as attributes or inputs, optional axes) becomes a Pad,
each computing exactly what the module (or onnxruntime) computes; certnet's export writes it
back. Reflect, replicate, circular (ONNX edge, wrap) padding and padding the batch are refused
naming the node. Bounds of every method contain sampled and attacked outputs, are exact at
radius 0 and lie below the MILP oracle; the rule's charges hold in exact rational arithmetic,
with pad values of 1e300, 1e-300 and 0.1 (not a float32: a float32 walk rounds it outward)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact import exact_layer, rationals
from exact import flat_rationals as _flat
from graph_checks import agree_with_onnxruntime, attacked_minimum, save_onnx
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules import LayerInput, rule_for
from certnet.errors import UnsupportedLayerError
from certnet.export import to_onnx
from certnet.falsify import falsify
from certnet.graph.fx_import import from_module
from certnet.graph.onnx_import import load_onnx
from certnet.nn.lipschitz import convert_sequential
from certnet.nn.pad import TORCH_PADS, Pad, pad_of
from certnet.threat import ThreatModel
from certnet.verify.lowering import network_ops
from certnet.verify.oracle import exact_min_margin

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper  # noqa: E402

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
F64 = torch.float64


def exact_pad(m: nn.Module, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """The padding of one point of ``shape`` in Fractions: entry k + 1 of the padded index
    map is input k, 0 the constant."""
    padding, value = pad_of(m)
    index = F.pad(torch.arange(1, int(np.prod(shape)) + 1, dtype=F64).view(1, *shape),
                  padding)[0].long()

    def apply(v: np.ndarray) -> np.ndarray:
        flat = v.reshape(-1)
        out = np.array([flat[k - 1] if k else Fraction(value) for k in index.reshape(-1).tolist()],
                       dtype=object)
        return out.reshape(tuple(index.shape))
    return apply


def exact_net(layers: nn.Sequential, shape: tuple[int, ...]) -> Callable[[torch.Tensor], list]:
    steps, x = [], torch.zeros(1, *shape, dtype=F64)
    for m in layers:
        steps.append(exact_pad(m, tuple(x.shape[1:])) if type(m) in (Pad, *TORCH_PADS)
                     else exact_layer(m))
        with torch.no_grad():
            x = m(x)

    def run(point: torch.Tensor) -> list:
        v = rationals(point)
        for step in steps:
            v = step(v)
        return list(v.reshape(-1))
    return run


# -- torch.fx --------------------------------------------------------------------------------
class Line(nn.Module):
    """F.pad with values, crops and a new channel; ZeroPad2d, ConstantPad2d, ConstantPad1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        with torch.no_grad():
            self.conv.bias.add_(0.45)  # unstable ReLUs on the test's boxes
        self.zero, self.const = nn.ZeroPad2d((1, 0, 2, 1)), nn.ConstantPad2d(1, -0.75)
        self.line = nn.ConstantPad1d((2, 0), 0.3)
        self.fc = nn.Linear(194, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.pad(x, (1, 1, 1, 1), value=0.5))  # (B, 2, 4, 4)
        h = self.const(torch.relu(self.zero(h)))  # (B, 2, 9, 7)
        h = F.pad(h, [-1, 2, 0, -1])  # crops and zeros: (B, 2, 8, 8)
        h = F.pad(h, (0, 0, 0, 0, 1, 0), mode="constant", value=0.1)  # a channel: (B, 3, 8, 8)
        return self.fc(self.line(h.flatten(1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fx_reads_constant_padding_in_every_spelling(dtype):
    torch.manual_seed(0)
    net = Line().to(dtype).eval()
    graph = from_module(net, (1, 4, 4))  # checks graph == module bit for bit
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Pad", "Conv2d", "ZeroPad2d", "ReLU", "ConstantPad2d", "Pad", "Pad", "Flatten",
        "ConstantPad1d", "Linear"]
    assert graph.nodes[0].op.value == 0.5 and graph.nodes[6].op.value == \
        float(torch.tensor(0.1, dtype=dtype))  # the value F.pad takes in the input's dtype
    x = torch.rand(5, 1, 4, 4, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(graph(x), net(x))
    converted = convert_sequential(graph.sequential(), (1, 4, 4))
    assert [type(m).__name__ for m in converted].count("Pad") == 6
    with torch.no_grad():
        assert torch.equal(converted(x), net(x))


@pytest.mark.parametrize(("step", "error"), [
    (lambda net, h: F.pad(h, (1, 1, 1, 1), mode="reflect"), r"'pad' .*mode 'reflect'"),
    (lambda net, h: F.pad(h, (1, 1, 1, 1), mode="replicate"), "mode 'replicate'"),
    (lambda net, h: F.pad(h, (1, 1, 1, 1), mode="circular"), "mode 'circular'"),
    (lambda net, h: net.reflect(h), r"'reflect' \(reflect: ReflectionPad2d\).*constant padding "
     "only"),
    (lambda net, h: F.pad(h, (0, 0, 0, 0, 0, 0, 1, 0)), "pad the batch"),
    (lambda net, h: F.pad(h, (-2, -2)), "empty"),
])
def test_fx_refuses_other_padding_naming_the_node(step, error):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.reflect = nn.ReflectionPad2d(1)

        def forward(self, x):
            return step(self, self.conv(x))

    with pytest.raises(UnsupportedLayerError, match=error) as info:
        from_module(Net().eval(), (1, 6, 6))
    assert "fx node" in str(info.value)


# -- ONNX ------------------------------------------------------------------------------------
def _ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def test_onnx_reads_pad_in_constant_mode_in_every_opset(tmp_path):
    k = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    common = [helper.make_node("Conv", ["a", "k"], ["b"]), helper.make_node("Relu", ["b"], ["c"])]
    cases = {  # opset -> (the two Pad nodes, their initializers)
        10: ([helper.make_node("Pad", ["x"], ["a"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.25),
              helper.make_node("Pad", ["c"], ["d"], mode="constant",
                               pads=[0, 0, 0, 2, 0, 0, -1, 0])], {}),
        13: ([helper.make_node("Pad", ["x", "p1", "v1"], ["a"]),
              helper.make_node("Pad", ["c", "p2"], ["d"], mode="constant")],
             {"p1": _ints(0, 0, 1, 1, 0, 0, 1, 1), "v1": np.array(0.25, np.float32),
              "p2": _ints(0, 0, 0, 2, 0, 0, -1, 0)}),
        18: ([helper.make_node("Pad", ["x", "p1", "v1", "ax1"], ["a"]),
              helper.make_node("Pad", ["c", "p2", "", "ax2"], ["d"])],
             {"p1": _ints(1, 1, 1, 1), "v1": np.array(0.25, np.float32), "ax1": _ints(2, -1),
              "p2": _ints(0, 2, -1, 0), "ax2": _ints(2, 3)}),
    }
    for opset, (pads, inits) in cases.items():
        nodes = [pads[0], *common, pads[1], helper.make_node("Flatten", ["d"], ["e"]),
                 helper.make_node("Gemm", ["e", "w", "bias"], ["y"], transB=1)]
        weights = np.random.default_rng(1).standard_normal((3, 2 * 3 * 6)).astype(np.float32)
        path = save_onnx(tmp_path, nodes, {**inits, "k": k, "w": weights,
                                           "bias": np.zeros(3, np.float32)}, ["N", 1, 4, 4],
                         ["N", 3], opset, name=f"m{opset}.onnx")
        graph = load_onnx(path)
        assert [type(n.op).__name__ for n in graph.nodes] == [
            "Pad", "Conv2d", "ReLU", "Pad", "Flatten", "Linear"], opset
        assert graph.nodes[0].op.padding == (1, 1, 1, 1) and graph.nodes[0].op.value == 0.25
        assert graph.nodes[3].op.padding == (2, 0, 0, -1) and graph.nodes[3].op.value == 0
        agree_with_onnxruntime(path, graph)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap", "batch"])
def test_onnx_refuses_other_padding_naming_the_node(tmp_path, mode):
    pads = _ints(1, 0, 0, 0, 0, 0, 0, 0) if mode == "batch" else _ints(0, 0, 1, 1, 0, 0, 1, 1)
    node = helper.make_node("Pad", ["x", "p"], ["y"], name="pad",
                            mode="constant" if mode == "batch" else mode)
    path = save_onnx(tmp_path, [node], {"p": pads}, [1, 1, 4, 4], [1, 1, 6, 6])
    with pytest.raises(UnsupportedLayerError, match="batch" if mode == "batch" else
                       f"Pad mode '{mode}'.*constant padding only") as info:
        load_onnx(path)
    assert "ONNX node 'pad' (Pad)" in str(info.value)


def tiny_net() -> nn.Sequential:
    """(1, 2, 2) -> Pad (0.5) -> Conv -> ReLU -> crop / pad with -1 -> Flatten -> Linear."""
    g = torch.Generator().manual_seed(0)
    conv, head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 3 * 1, 3)
    with torch.no_grad():
        for t in (conv.weight, conv.bias, head.weight, head.bias):
            t.copy_(torch.randn(t.shape, generator=g).float())
    return nn.Sequential(Pad([1, 1, 1, 1], 0.5), conv, nn.ReLU(), Pad([-1, 0, 0, 1], -1.0),
                         nn.Flatten(), head).double().eval()


def test_certnet_export_of_pads_comes_back(tmp_path):
    layers = tiny_net()
    path = tmp_path / "net.onnx"
    path.write_bytes(to_onnx(layers, (1, 2, 2)).SerializeToString())
    graph = load_onnx(path)
    assert [type(n.op) for n in graph.nodes] == [Pad, nn.Conv2d, nn.ReLU, Pad, nn.Flatten,
                                                 nn.Linear]
    assert [pad_of(n.op) for n in graph.nodes if type(n.op) is Pad] == \
        [pad_of(m) for m in layers if type(m) is Pad]
    x = torch.rand(5, 1, 2, 2, dtype=F64)
    with torch.no_grad():
        assert torch.equal(graph(x), layers(x))  # float32 weights: read back exactly
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = session.run(None, {"input": x.float().numpy()})[0]
    assert np.abs(ref - layers(x).detach().numpy()).max() <= 1e-5


def test_the_lowering_is_the_padding():
    layers = tiny_net()
    ops, shape = network_ops(layers[:4], (1, 2, 2))
    assert shape == (2, 3, 1) and [op[0] for op in ops] == ["affine", "affine", "relu",
                                                            "affine"]
    x = torch.rand(1, 1, 2, 2, dtype=F64)
    v = x.reshape(-1).numpy()
    for op in ops:
        v = op[1] @ v + op[2] if op[0] == "affine" else np.maximum(v, 0)
    with torch.no_grad():
        assert np.allclose(v, layers[:4](x).reshape(-1).numpy(), rtol=0, atol=1e-12)


# -- bounds ----------------------------------------------------------------------------------
def test_bounds_contain_sampled_and_attacked_outputs_and_are_exact_at_zero():
    torch.manual_seed(0)
    chain = from_module(Line().double().eval(), (1, 4, 4)).chain()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 4, 4, dtype=F64, generator=g)
    spec = torch.randn(2, 3, 3, dtype=F64, generator=g)
    eps = 0.05
    values = attacked_minimum(chain, x, eps, spec)
    for method in METHODS:
        for rigorous in (False, True):
            bound = spec_bounds(chain, x, ThreatModel("linf", eps), spec, method,
                                rigorous=rigorous).detach()
            slack = 0 if rigorous else 1e-12  # a plain bound may round by an ulp
            assert (bound <= values + slack).all(), (method, rigorous)
    with torch.no_grad():
        exact = torch.einsum("bk,bsk->bs", chain(x), spec)
    for method in METHODS:
        at_zero = spec_bounds(chain, x, ThreatModel("linf", 0.0), spec, method,
                              rigorous=True).detach()
        assert (at_zero <= exact).all() and torch.allclose(at_zero, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(2))
def test_the_milp_oracle_lies_above_every_rigorous_bound(seed):
    layers = tiny_net()
    x = torch.rand(1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))
    label = int(layers(x[None]).argmax())
    rows = [j for j in range(3) if j != label]
    spec = torch.zeros(1, 2, 3, dtype=F64)
    for r, j in enumerate(rows):
        spec[0, r, label], spec[0, r, j] = 1.0, -1.0
    for eps in (0.05, 0.2):
        oracle = exact_min_margin(layers, x, label, eps, "linf")
        for method in METHODS:
            bound = spec_bounds(layers, x[None], ThreatModel("linf", eps), spec, method,
                                rigorous=True).detach().min()
            assert float(bound) <= oracle, (method, eps)


# -- rounding in exact arithmetic ------------------------------------------------------------
CASES = [("huge", [1, 2, 0, 1], 1e300), ("tiny", [2, -1, -1, 1], -1e-300),
         ("decimal", [1, 1, 1, 1, 1, 0], 0.1), ("zero", [0, 3, 2, 0], 0.0)]


def _box(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = torch.exp2(torch.empty(shape, dtype=F64).uniform_(-60, 8, generator=g))
    lo = (torch.rand(shape, generator=g, dtype=F64) - 0.5).sign() * size
    width = torch.rand(shape, generator=g, dtype=F64) * size * \
        torch.randint(0, 2, shape, generator=g)
    return lo.unsqueeze(0), (lo + width).unsqueeze(0)


def _ends(t: torch.Tensor) -> list[Fraction | float]:
    """Exact values, infinite ends kept as floats (a float32 walk rounds 1e300 up to inf)."""
    return [Fraction(v) if math.isfinite(v) else v for v in t.double().reshape(-1).tolist()]


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("name", "padding", "value"), CASES, ids=[c[0] for c in CASES])
def test_the_rule_is_exact_in_exact_arithmetic(name, padding, value, seed):
    """The interval (float64 and float32 walks: 0.1 rounded outward) holds the exact and the
    float64 outputs; a backward step with its charge is a valid lower bound; the drift pads the
    input error with zeros."""
    shape = (2, 3, 3)
    m = Pad(padding, value)
    exact = exact_pad(m, shape)
    lo, hi = _box(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    points = [torch.where(torch.rand(lo.shape, generator=g) < 0.5, lo, hi) for _ in range(8)]
    rule = rule_for(m)
    for box in (LayerInput(lo, hi, lo), LayerInput(lo.float(), hi.float(), lo.float())):
        low, high = (_ends(t) for t in layer_interval(copy.deepcopy(m), box, rigorous=True))
        for h in points:
            h = h.clamp(box.lo.double(), box.hi.double())
            with torch.no_grad():
                computed = _flat(m(h))
            for values in (list(exact(rationals(h[0])).reshape(-1)), computed):
                assert all(a <= v <= b for a, v, b in zip(low, values, high, strict=True))
    inp = LayerInput(lo, hi, lo)
    out_shape = tuple(m(lo).shape[1:])
    lam = torch.randn(1, 2, *out_shape, generator=g, dtype=F64) * \
        torch.exp2(torch.randint(-30, 4, (1, 2, *out_shape), generator=g)).double()
    rho = torch.as_tensor(rule.backward_error(m, inp), dtype=F64)
    lam_h, const = rule.backward(m, lam, inp, "adaptive")
    charge = lam.abs().flatten(2).sum(2) * rho
    for h in points:
        z, hh = list(exact(rationals(h[0])).reshape(-1)), _flat(h)
        for r in range(2):
            left = sum(a * b for a, b in zip(_flat(lam[:, r]), z, strict=True))
            right = sum(a * b for a, b in zip(_flat(lam_h[:, r]), hh, strict=True)) + \
                Fraction(float(const[0, r]))
            assert left >= right - Fraction(float(charge[0, r]))
    assert (rho == 0) == (value == 0)
    error = torch.rand(1, *shape, generator=g, dtype=F64)
    assert torch.equal(rule.drift(m, error, inp), F.pad(error, m.padding))


def padded_conv() -> nn.Sequential:
    """(1, 2, 2) -> Pad(1e16) -> Conv -> ReLU -> Pad(1e-300) -> Flatten -> Linear. Channel 0's
    kernel puts weight 1 on the padded entries of every window (its edges 0.5, corners 0) and
    its bias -1e16 cancels them: exactly an O(1) value, which float64 rounds to a multiple of
    2 next to 1e16; channel 1 reads the centre only."""
    conv, head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[0.0, 0.5, 0.0], [0.5, 2.0, 0.5], [0.0, 0.5, 0.0]]],
                                        [[[0.0, 0.0, 0.0], [0.0, -1.5, 0.0], [0.0, 0.0, 0.0]]]]))
        conv.bias.copy_(torch.tensor([-1e16, 0.25]))
        head.weight.copy_(torch.linspace(-1, 1, 2 * 16).view(2, 16))
        head.bias.zero_()
    return nn.Sequential(Pad([1, 1, 1, 1], 1e16), conv, nn.ReLU(), Pad([0, 0, 1, 1], 1e-300),
                         nn.Flatten(), head).double().eval()


@pytest.mark.parametrize("method", METHODS)
def test_rigorous_bounds_hold_for_the_exact_and_the_float64_network(method):
    layers = padded_conv()
    exact = exact_net(layers, (1, 2, 2))
    x = torch.tensor([[[[0.25, 0.5], [0.75, 0.375]]]], dtype=F64)
    eps = 0.125
    spec = torch.tensor([[[1.0, -1.0], [-1.0, 0.5]]], dtype=F64)
    bound = spec_bounds(layers, x, ThreatModel("linf", eps), spec, method, rigorous=True)
    bound = [Fraction(float(v)) for v in bound[0].detach()]
    assert all(abs(b) < 1e6 for b in bound)  # not vacuous
    points = [x[0] + eps * torch.tensor(c, dtype=F64).view(1, 2, 2)
              for c in itertools.product((-1.0, 1.0), repeat=4)]
    for s in range(2):
        found, _ = falsify(layers, x - eps, x + eps, lambda z, s=s: z @ spec[0, s], steps=20)
        points.append(found[0])
    rows = [[Fraction(float(v)) for v in row] for row in spec[0]]
    differ = 0
    for p in points:
        p = p.clamp(x[0] - eps, x[0] + eps)
        with torch.no_grad():
            computed = _flat(layers(p[None]))
        z = exact(p)
        for r in range(2):
            for out in (z, computed):
                assert bound[r] <= sum(a * b for a, b in zip(rows[r], out, strict=True))
        differ += z != computed
    assert differ  # rounding matters here: the float64 network is not the exact one
