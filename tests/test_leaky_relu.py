"""LeakyReLU end to end (issue 27): its bound rule (CROWN's ReLU relaxation shifted by the
linear part, alpha-CROWN's slopes in [a, 1]) holds against sampled and PGD outputs for every
method, is exact at eps = 0, tighter than IBP with CROWN, never above the exact MILP oracle;
its rounding charges hold in exact rational arithmetic at huge and subnormal magnitudes; torch.fx,
ONNX (torch's export and certnet's own, read back) bring it in; slopes outside [0, 1] are
refused."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact import rationals
from piecewise_checks import (
    box_points,
    check_backward,
    check_contains,
    check_exact_at_zero,
    check_oracle,
    check_rule_rounding,
    exact_forward,
    exact_of,
)
from torch import nn

from certnet.any_model import bounded
from certnet.bounds.ibp import layer_interval
from certnet.bounds.margins import margin_spec, spec_bounds
from certnet.bounds.rules import LayerInput, check_supported, rule_for
from certnet.certifiers import applicable
from certnet.errors import UnsupportedLayerError
from certnet.export import to_onnx
from certnet.graph.fx_import import from_module
from certnet.graph.onnx_import import load_onnx
from certnet.threat import ThreatModel
from certnet.verify.lowering import network_ops
from certnet.verify.oracle import exact_min_margin

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def mlp(a: float, d: int = 4, seed: int = 0, scale: float = 1.5) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 8), nn.LeakyReLU(a), nn.Linear(8, 6), nn.LeakyReLU(a),
                        nn.Linear(6, 3)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(scale)
    return net.eval()


def conv_net(a: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.LeakyReLU(a), nn.Conv2d(3, 2, 2),
                         nn.LeakyReLU(a), nn.Flatten(), nn.Linear(18, 3)).double().eval()


class Residual(nn.Module):
    """F.leaky_relu, F.leaky_relu_ and an nn.LeakyReLU around a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)
        self.act = nn.LeakyReLU(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc1(x), 0.1)
        h = self.act(self.fc2(h)) + h
        return self.fc3(F.leaky_relu_(h, negative_slope=0.5))


def _x(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.0, 0.01, 0.2, 0.5, 1.0])
def test_bounds_of_every_method_contain_sampled_and_pgd_outputs(a):
    check_contains(mlp(a), _x((4,)), eps=0.1)


def test_conv_and_graph_bounds_contain_sampled_and_pgd_outputs():
    check_contains(conv_net(0.1), _x((1, 4, 4)), eps=0.05)
    torch.manual_seed(1)
    graph = from_module(Residual().double().eval(), (3,))
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Linear", "LeakyReLU", "Linear", "LeakyReLU", "Add", "LeakyReLU", "Linear"]
    assert [n.op.negative_slope for n in graph.nodes if type(n.op) is nn.LeakyReLU] == \
        [0.1, 0.25, 0.5]
    check_contains(graph.chain(), _x((3,)), eps=0.1)


def test_eps_zero_bounds_are_exact():
    check_exact_at_zero(mlp(0.1), _x((4,)))
    check_exact_at_zero(conv_net(0.3), _x((1, 4, 4)))


def test_crown_is_tighter_than_ibp_and_alpha_crown_optimises_the_slopes():
    net, x = mlp(0.1, seed=3, scale=2.0), _x((4,), n=4, seed=3)
    with torch.no_grad():
        label = net(x).argmax(1)
    spec = margin_spec(label, 3).to(F64)
    threat = ThreatModel("linf", 0.15)
    ibp, crown, alpha = (spec_bounds(net, x, threat, spec, method, rigorous=True).detach()
                         for method in ("ibp", "crown", "alpha-crown"))
    assert (crown >= ibp).all() and (crown > ibp + 1e-3).any()
    assert (alpha >= crown).all() and (alpha > crown + 1e-6).any()
    starts = rule_for(net[1]).slopes(net[1], LayerInput(-torch.ones(1, 8, dtype=F64),
                                                        torch.ones(1, 8, dtype=F64), None),
                                     "adaptive")
    assert starts is not None and ((starts >= 0) & (starts <= 1)).all()


# -- the exact oracle ------------------------------------------------------------------------
def test_the_oracle_lowering_is_exact_and_agrees_with_the_rigorous_bounds():
    net = mlp(0.2, d=3, seed=1, scale=2.0)
    ops, out = network_ops(net, (3,))
    assert out == (3,)
    x = _x((3,), n=5, seed=2)
    v = x.numpy().T
    for op in ops:
        v = op[1] @ v + op[2][:, None] if op[0] == "affine" else np.maximum(v, 0)
    with torch.no_grad():
        assert np.abs(v.T - net(x).numpy()).max() <= 1e-12
    margins = []
    for b in range(3):
        oracle = check_oracle(net, x[b:b + 1], 0.08)
        margins.append(oracle)
        with torch.no_grad():  # the oracle's minimum is below every sampled margin
            z = net((x[b:b + 1] + 0.08 * (torch.rand(200, 3, dtype=F64) * 2 - 1)).clamp(0, 1))
        label = int(net(x[b:b + 1]).argmax())
        sampled = (z[:, label:label + 1] - z).scatter(1, torch.full((200, 1), label),
                                                       torch.inf).amin()
        assert oracle <= float(sampled) + 1e-6
    # certified points (crown, linf-lipschitz: its l_inf bound and drift) are robust
    model = bounded(net, (3,))
    assert {"crown", "linf-lipschitz"} <= set(applicable(model, "linf"))
    for certifier in ("crown", "linf-lipschitz"):
        cert = model.certify(x[:3], 0.08, certifier, "linf")
        for b in range(3):
            if bool(cert.certified[b]):
                assert exact_min_margin(net, x[b], int(cert.pred[b]), 0.08, "linf") > 0


def test_the_oracle_reads_leaky_relu_in_a_graph():
    torch.manual_seed(2)
    chain = from_module(Residual().double().eval(), (3,)).chain()
    check_oracle(chain, _x((3,), n=1, seed=4), 0.1)


# -- import, export, refusals ----------------------------------------------------------------
def test_torch_onnx_export_reads_back_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = conv_net(0.2).float()
    path = tmp_path / "leaky.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 1, 4, 4),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    graph = load_onnx(path)
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Conv2d", "LeakyReLU", "Conv2d", "LeakyReLU", "Flatten", "Linear"]
    assert graph.nodes[1].op.negative_slope == float(np.float32(0.2))
    x = np.random.default_rng(0).random((6, 1, 4, 4), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ours = graph(torch.from_numpy(x).double()).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * (1 + np.abs(ref).max())
    check_contains(graph.chain(), _x((1, 4, 4)), eps=0.05, methods=("ibp", "crown"))


def test_certnet_export_round_trips(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = mlp(0.3).float()
    path = tmp_path / "net.onnx"
    path.write_bytes(to_onnx(net, (4,)).SerializeToString())
    graph = load_onnx(path)
    assert [type(n.op) for n in graph.nodes] == [type(m) for m in net]
    assert graph.nodes[1].op.negative_slope == float(np.float32(0.3))
    x = np.random.default_rng(1).random((5, 4), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    with torch.no_grad():
        ours = graph(torch.from_numpy(x).double()).numpy()
        theirs = net(torch.from_numpy(x)).numpy()
    assert np.abs(ours - ref).max() <= 1e-5 and np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("a", [-0.1, 1.5])
def test_slopes_outside_zero_one_are_refused(a, tmp_path):
    net = nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(a), nn.Linear(3, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(LeakyReLU\).*negative_slope"):
        check_supported(net)
    with pytest.raises(UnsupportedLayerError, match="negative_slope"):
        spec_bounds(net, _x((2,)), ThreatModel("linf", 0.1), torch.ones(2, 1, 2, dtype=F64))
    model = bounded(net, (2,))
    assert "linf-lipschitz" not in applicable(model, "linf") and \
        "crown" not in applicable(model, "linf")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("LeakyRelu", ["x"], ["y"], name="lr", alpha=a)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                      ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "lr.onnx")
    with pytest.raises(UnsupportedLayerError, match=r"'lr' \(LeakyRelu\).*alpha"):
        load_onnx(tmp_path / "lr.onnx")


# -- rounding --------------------------------------------------------------------------------
def _box(shape: tuple[int, ...], scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ends of mixed signs and magnitudes (log-uniform over 2^-40 .. scale), some boxes
    degenerate, some across 0, and one at the smallest subnormals."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp2(torch.empty(shape, dtype=F64).uniform_(-40, 0, generator=g)) * scale
    lo = (torch.rand(shape, generator=g, dtype=F64) - 0.5).sign() * size
    width = torch.rand(shape, generator=g, dtype=F64) * size * \
        torch.randint(0, 2, shape, generator=g)
    hi = lo + width
    lo.view(-1)[0], hi.view(-1)[0] = -3 * 2.0**-1074, 5 * 2.0**-1074
    return lo.unsqueeze(0), hi.unsqueeze(0)


@pytest.mark.parametrize("a", [0.01, 0.1, 1 / 3, 0.75, 1.0, 0.0])
@pytest.mark.parametrize("scale", [1.0, 2.0**52, 1e300, 1e-300])
def test_rule_rounding_holds_in_exact_arithmetic(a, scale):
    """Interval, backward step with its charge (every slope choice, random alpha-CROWN
    slopes) and drift, checked with Fractions at adversarial magnitudes."""
    for seed in range(2):
        lo, hi = _box((5,), scale, seed)
        check_rule_rounding(nn.LeakyReLU(a), lo, hi, seed)


def test_the_unwidened_interval_misses_exact_outputs():
    """Non-vacuity: fl(lo * a) rounds above lo * a for some ends, so the plain interval
    excludes an exact output that the rigorous one holds."""
    m = nn.LeakyReLU(0.1)
    lo = -torch.rand(1, 64, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    inp = LayerInput(lo, lo, lo)
    exact = exact_of(m)(rationals(lo[0]))
    plain, _ = layer_interval(m, inp)
    rigorous, _ = layer_interval(m, inp, rigorous=True)
    misses = sum(Fraction(float(p)) > v for p, v in zip(plain[0], exact, strict=True))
    assert misses > 0
    assert all(Fraction(float(r)) <= v for r, v in zip(rigorous[0], exact, strict=True))


def test_the_charge_of_the_slope_map_is_needed_somewhere():
    """Non-vacuity of the backward charge: with huge cancelling coefficients the uncharged
    step (1 - a rounds for a = 0.1) claims more than lam . z somewhere; charged, it holds."""
    m = nn.LeakyReLU(0.1)
    g = torch.Generator().manual_seed(0)
    lo = -torch.rand(1, 6, generator=g, dtype=F64) * 2.0**40
    hi = torch.rand(1, 6, generator=g, dtype=F64) * 2.0**40
    inp = LayerInput(lo, hi, hi)
    found = box_points(lo, hi, 0)
    exacts = [exact_of(m)(rationals(h[0])) for h in found]
    broke = 0
    for k in range(8):
        lam = torch.randn(1, 2, 6, generator=g, dtype=F64) * 2.0**k
        broke += not check_backward(m, lam, inp, found, exacts, charged=False)
        check_backward(m, lam, inp, found, exacts)
    assert broke > 0


def test_network_bounds_hold_against_exact_and_float64_outputs_at_huge_magnitudes():
    """Cancelling 2^52 weights and biases around LeakyReLUs: every rigorous bound lies below
    the exact margin (Fractions) and the float64 forward pass's, at box points and PGD."""
    net = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.1), nn.Linear(3, 3), nn.LeakyReLU(0.3),
                        nn.Linear(3, 2)).double()
    big = 2.0**52
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[big, 1.0, -0.5], [-big, 0.75, 2.0], [1.0, -1.0, 1e-3]]))
        net[0].bias.copy_(torch.tensor([-big * 0.5, big * 0.5, 0.1]))
        net[2].weight.copy_(torch.tensor([[1e8, -1e8, 1.0], [2.0, 1.0, -3.0],
                                          [-1e-8, 1.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.5, -1e8, 0.0]))
        net[4].weight.copy_(torch.tensor([[1.0, 1e-8, -2.0], [-1.0, 3.0, 1.0]]))
        net[4].bias.copy_(torch.tensor([1e-3, -2.0]))
    x = torch.tensor([[0.5, 0.25, 0.75]], dtype=F64)
    spec = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], dtype=F64)
    for eps in (0.0, 2.0**-50, 1e-3):
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        found = box_points(lo, hi, 0, corners=8)
        for method in ("ibp", "crown", "alpha-crown"):
            bound = spec_bounds(net, x, ThreatModel("linf", eps), spec, method,
                                rigorous=True).detach()
            for h in found:
                z = exact_forward(net, h[0])
                with torch.no_grad():
                    computed = [Fraction(float(v)) for v in net(h)[0]]
                for s in range(2):
                    row = [Fraction(float(c)) for c in spec[0, s]]
                    for values in (z, computed):
                        value = sum(c * v for c, v in zip(row, values, strict=True))
                        assert Fraction(float(bound[0, s])) <= value, (method, eps, s)
