"""MaxPool2d end to end (issue 27): its bound rule (auto_LiRPA's BoundMaxPool: the max is at
least the input of largest lower bound, equal to it where that input dominates its window,
else at most the window's largest upper bound) holds against sampled and PGD outputs for every
method, with padding, dilation, non-square and overlapping windows; exact at eps = 0, tighter
than IBP with CROWN, never above the exact MILP oracle (a tree of MinMax pairs); its rounding
charges (overlapping windows sum coefficients) hold in exact rational arithmetic at huge
magnitudes; torch.fx and ONNX (torch's export and certnet's own) bring it in; ceil_mode and
return_indices are refused."""

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
from certnet.bounds.margins import margin_spec, spec_bounds
from certnet.bounds.rules import LayerInput, check_supported, rule_for
from certnet.certifiers import applicable
from certnet.errors import UnsupportedLayerError
from certnet.export import to_onnx
from certnet.graph.fx_import import from_module
from certnet.graph.onnx_import import load_onnx
from certnet.nn.spec import describe_layers
from certnet.threat import ThreatModel
from certnet.verify.lowering import network_ops
from certnet.verify.oracle import exact_min_margin

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")

#: (name, pool, input map size): disjoint, overlapping with padding, dilated, non-square
POOLS = [("k2", lambda: nn.MaxPool2d(2), 6),
         ("k3s2p1", lambda: nn.MaxPool2d(3, 2, 1), 5),
         ("k2d2", lambda: nn.MaxPool2d(2, 1, dilation=2), 5),
         ("k2x3", lambda: nn.MaxPool2d((2, 3), (1, 2), (1, 0)), 5)]


def pooled(pool: nn.MaxPool2d, size: int, seed: int = 0, act: bool = True) -> nn.Sequential:
    """conv (2 channels, padding 1) -> [ReLU] -> pool -> flatten -> dense head of 3."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), *([nn.ReLU()] if act else []), pool,
                         nn.Flatten())
    with torch.no_grad():
        width = body(torch.zeros(1, 1, size, size)).shape[1]
    return nn.Sequential(*body, nn.Linear(width, 3)).double().eval()


class Pools(nn.Module):
    """F.max_pool2d, torch.max_pool2d and an nn.MaxPool2d module, with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.conv(x), 3, stride=1, padding=1)  # (B, 2, 5, 5)
        h = torch.max_pool2d(h, 2, 2) + F.max_pool2d(h.relu(), kernel_size=2)  # (B, 2, 2, 2)
        return self.fc(self.pool(torch.cat([h, -h], 1)).flatten(1))


def _x(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "pool", "size"), POOLS, ids=[p[0] for p in POOLS])
def test_bounds_of_every_method_contain_sampled_and_pgd_outputs(name, pool, size):
    check_contains(pooled(pool(), size, act=name != "k2"), _x((1, size, size)), eps=0.05)


def test_graph_bounds_contain_sampled_and_pgd_outputs():
    torch.manual_seed(0)
    graph = from_module(Pools().double().eval(), (1, 5, 5))
    names = [type(n.op).__name__ for n in graph.nodes]
    assert names.count("MaxPool2d") == 4
    pools = [n.op for n in graph.nodes if type(n.op) is nn.MaxPool2d]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [
        (3, 1, 1), (2, 2, 0), (2, 2, 0), (2, 1, 0)]
    check_contains(graph.chain(), _x((1, 5, 5)), eps=0.03)


def test_eps_zero_bounds_are_exact():
    for _, pool, size in POOLS:
        check_exact_at_zero(pooled(pool(), size), _x((1, size, size)))


def test_crown_is_tighter_than_ibp():
    net, x = pooled(nn.MaxPool2d(3, 2, 1), 5, seed=2), _x((1, 5, 5), n=4, seed=1)
    with torch.no_grad():
        label = net(x).argmax(1)
    spec = margin_spec(label, 3).to(F64)
    threat = ThreatModel("linf", 0.05)
    ibp, crown, alpha = (spec_bounds(net, x, threat, spec, method, rigorous=True).detach()
                         for method in ("ibp", "crown", "alpha-crown"))
    assert (crown >= ibp).all() and (crown > ibp + 1e-3).any()
    assert (alpha >= crown).all()


def test_dominated_windows_are_exact_and_stable():
    """A window whose largest lower bound is above every other input's upper bound is the
    identity on that input (no constant, no unstable neuron); an undominated one is not."""
    pool = nn.MaxPool2d(2)
    lo = torch.tensor([[[[3.0, 0.0], [1.0, 2.0]]]], dtype=F64)
    hi = lo + torch.tensor([[[[1.0, 3.5], [0.5, 0.5]]]], dtype=F64)
    rule = rule_for(pool)
    lam = torch.tensor([[[[[-2.0]]]]], dtype=F64)
    assert not rule.unstable(pool, lo, lo + 0.5).any()
    coef, const = rule.backward(pool, lam, LayerInput(lo, lo + 0.5, lo), "adaptive")
    assert coef.flatten().tolist() == [-2.0, 0.0, 0.0, 0.0] and float(const) == 0.0
    assert rule.unstable(pool, lo, hi).all()
    coef, const = rule.backward(pool, lam, LayerInput(lo, hi, lo), "adaptive")
    assert not coef.any() and float(const) == -2.0 * 4.0
    assert rule.l2_lipschitz(pool, None) == 1.0
    assert rule.l2_lipschitz(nn.MaxPool2d(3, 2), None) == pytest.approx(2.0)
    assert rule.l2_lipschitz(nn.MaxPool2d(3, 1), None) >= 3.0


# -- the exact oracle ------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "pool", "size"), POOLS[:3], ids=[p[0] for p in POOLS[:3]])
def test_the_oracle_lowering_is_exact_and_agrees_with_the_rigorous_bounds(name, pool, size):
    net = pooled(pool(), 3 if name == "k2" else 4, seed=1, act=False)
    shape = (1, 3, 3) if name == "k2" else (1, 4, 4)
    ops, out = network_ops(net, shape)
    assert out == (3,) and "minmax" in [op[0] for op in ops]
    x = _x(shape, n=2, seed=2)
    v = x.flatten(1).numpy().T
    for op in ops:
        if op[0] == "affine":
            v = op[1] @ v + op[2][:, None]
        else:
            half = len(v) // 2
            v = np.concatenate([np.minimum(v[:half], v[half:]), np.maximum(v[:half], v[half:])])
    with torch.no_grad():
        assert np.abs(v.T - net(x).numpy()).max() <= 1e-12
    oracle = check_oracle(net, x[:1], 0.1)
    with torch.no_grad():  # the oracle's minimum is below every sampled margin
        z = net((x[:1] + 0.1 * (torch.rand(300, *shape, dtype=F64) * 2 - 1)).clamp(0, 1))
        label = int(net(x[:1]).argmax())
    sampled = (z[:, label:label + 1] - z).scatter(1, torch.full((300, 1), label),
                                                   torch.inf).amin()
    assert oracle <= float(sampled) + 1e-6


def test_certified_points_are_robust_and_the_oracle_reads_graphs():
    torch.manual_seed(3)
    net = nn.Sequential(nn.MaxPool2d(2, 1), nn.Flatten(), nn.Linear(4, 6), nn.ReLU(),
                        nn.Linear(6, 3)).double()
    x = _x((1, 3, 3), n=3, seed=4)
    model = bounded(net, (1, 3, 3))
    assert {"crown", "alpha-crown", "linf-lipschitz"} <= set(applicable(model, "linf"))
    for certifier in ("crown", "linf-lipschitz"):
        cert = model.certify(x, 0.02, certifier, "linf")
        for b in range(3):
            if bool(cert.certified[b]):
                assert exact_min_margin(net, x[b], int(cert.pred[b]), 0.02, "linf") > 0
    torch.manual_seed(1)
    chain = from_module(Pools().double().eval(), (1, 5, 5)).chain()
    check_oracle(chain, _x((1, 5, 5), n=1, seed=5), 0.02)


# -- import, export, refusals ----------------------------------------------------------------
def test_torch_onnx_export_reads_back_and_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.ReLU(),
                        nn.MaxPool2d(2, 1, dilation=2, padding=1), nn.Flatten(),
                        nn.Linear(18, 3)).eval()
    path = tmp_path / "pool.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 1, 6, 6),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    graph = load_onnx(path)
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Conv2d", "MaxPool2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert graph.nodes[3].op.dilation == (2, 2) and graph.nodes[1].op.stride == (2, 2)
    x = np.random.default_rng(0).random((6, 1, 6, 6), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    ours = graph(torch.from_numpy(x).double()).detach().numpy()
    assert np.abs(ours - ref).max() <= 1e-5 * (1 + np.abs(ref).max())
    check_contains(graph.chain(), _x((1, 6, 6)), eps=0.03, methods=("ibp", "crown"))


def _onnx_pool(tmp_path, **attrs):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["x"], ["y"], name="mp", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", 2, 5, 5])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 2, "h", "w"])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    path = tmp_path / "mp.onnx"
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("attrs", [dict(kernel_shape=[3, 3]),
                                   dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 0]),
                                   dict(kernel_shape=[2, 2], dilations=[2, 1], pads=[1, 1, 1, 1])])
def test_onnx_max_pool_attributes_match_onnxruntime(tmp_path, attrs):
    ort = pytest.importorskip("onnxruntime")
    path = _onnx_pool(tmp_path, **attrs)
    graph = load_onnx(path)
    x = np.random.default_rng(1).standard_normal((3, 2, 5, 5)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert np.array_equal(graph(torch.from_numpy(x).double()).detach().numpy(), ref)


@pytest.mark.parametrize(("attrs", "message"), [
    (dict(kernel_shape=[2, 2], ceil_mode=1), "ceil_mode=1"),
    (dict(kernel_shape=[3, 3], pads=[1, 1, 0, 0]), "symmetric padding"),
    (dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER"), "auto_pad"),
    (dict(kernel_shape=[2, 2], storage_order=1), "storage_order"),
])
def test_onnx_max_pool_settings_outside_the_rule_are_refused(tmp_path, attrs, message):
    with pytest.raises(UnsupportedLayerError, match=rf"'mp' \(MaxPool\).*{message}"):
        load_onnx(_onnx_pool(tmp_path, **attrs))


def test_certnet_export_round_trips(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(3, 2, 1),
                        nn.MaxPool2d((2, 1), 1, dilation=(1, 2)), nn.Flatten(),
                        nn.Linear(12, 3)).eval()
    path = tmp_path / "net.onnx"
    path.write_bytes(to_onnx(net, (1, 5, 5)).SerializeToString())
    graph = load_onnx(path)
    assert [type(n.op) for n in graph.nodes] == [type(m) for m in net]
    x = np.random.default_rng(2).random((4, 1, 5, 5), dtype=np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    with torch.no_grad():
        ours = graph(torch.from_numpy(x).double()).numpy()
        theirs = net.double()(torch.from_numpy(x).double()).numpy()
    assert np.array_equal(ours, theirs) and np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, ceil_mode=True),
                                  nn.MaxPool2d(2, return_indices=True)])
def test_ceil_mode_and_indices_are_refused(pool):
    net = nn.Sequential(nn.Conv2d(1, 1, 2), pool, nn.Flatten(), nn.Linear(4, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(MaxPool2d\).*ceil_mode"):
        check_supported(net)
    with pytest.raises(UnsupportedLayerError, match="not exported"):
        to_onnx(net, (1, 5, 5))
    with pytest.raises(UnsupportedLayerError, match="verify: MaxPool2d"):
        network_ops(net, (1, 5, 5))
    with pytest.raises(UnsupportedLayerError, match="cannot describe MaxPool2d"):
        describe_layers(net[1:2])

    class Ceil(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2, ceil_mode=True).flatten(1)

    with pytest.raises(UnsupportedLayerError, match="ceil_mode"):
        from_module(Ceil(), (1, 5, 5))


# -- rounding --------------------------------------------------------------------------------
def _box(shape: tuple[int, ...], scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ends of mixed signs and magnitudes (log-uniform over 2^-40 .. scale), some boxes
    degenerate, a few overlapping boxes at the same place, one at the smallest subnormals."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp2(torch.empty(shape, dtype=F64).uniform_(-40, 0, generator=g)) * scale
    lo = (torch.rand(shape, generator=g, dtype=F64) - 0.5).sign() * size
    width = torch.rand(shape, generator=g, dtype=F64) * size * \
        torch.randint(0, 2, shape, generator=g)
    hi = lo + width
    lo.view(-1)[0], hi.view(-1)[0] = -3 * 2.0**-1074, 5 * 2.0**-1074
    lo.view(-1)[1], hi.view(-1)[1] = lo.view(-1)[2], hi.view(-1)[2]
    return lo.unsqueeze(0), hi.unsqueeze(0)


@pytest.mark.parametrize(("name", "pool", "size"), POOLS, ids=[p[0] for p in POOLS])
@pytest.mark.parametrize("scale", [1.0, 2.0**60, 1e300])
def test_rule_rounding_holds_in_exact_arithmetic(name, pool, size, scale):
    """Interval, backward step with its charge (coefficients over 2^+-40) and drift, checked
    with Fractions at adversarial magnitudes."""
    lo, hi = _box((1, 3, 3), scale, seed=len(name))
    check_rule_rounding(pool(), lo, hi, seed=1, lam_scale=40)


def test_overlapping_windows_need_their_sum_charge():
    """Non-vacuity: three windows share their dominating input; coefficients 2^53, 1, -2^53
    (in some order) sum to 0 in floats, not 1, so the uncharged step claims h >= 0 for
    h = -1; the charge covers it."""
    pool = nn.MaxPool2d((1, 3), 1)
    lo = torch.tensor([[[[-9.0, -9.0, -1.0, -9.0, -9.0]]]], dtype=F64)
    hi = torch.tensor([[[[-8.0, -8.0, 1.0, -8.0, -8.0]]]], dtype=F64)
    inp = LayerInput(lo, hi, lo)
    found = box_points(lo, hi, 0)
    exacts = [exact_of(pool)(rationals(h[0])) for h in found]
    broke = 0
    big = 2.0**53
    for order in ([big, 1.0, -big], [-big, big, 1.0], [1.0, -big, big], [-big, 1.0, big],
                  [big, -big, 1.0], [1.0, big, -big]):
        lam = torch.tensor(order, dtype=F64).view(1, 1, 1, 1, 3)
        broke += not check_backward(pool, lam, inp, found, exacts, charged=False)
        check_backward(pool, lam, inp, found, exacts)
    assert broke > 0


def test_network_bounds_hold_against_exact_and_float64_outputs_at_huge_magnitudes():
    """A convolution with cancelling 1e16 weights and bias before overlapping pools: every
    rigorous bound lies below the exact value (Fractions) and the float64 forward pass's."""
    net = nn.Sequential(nn.Conv2d(1, 2, 2, padding=1), nn.MaxPool2d(2, 1), nn.ReLU(),
                        nn.MaxPool2d(2, 1, padding=1), nn.Flatten(), nn.Linear(18, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[[[1e16, 1.0], [-1e16, 0.5]]],
                                          [[[-2.0**-40, 3.0], [1e-3, -1.0]]]]))
        net[0].bias.copy_(torch.tensor([1e16, -1.5]))
        weight = torch.randn(2, 18, generator=torch.Generator().manual_seed(0), dtype=F64)
        weight[0, ::3] = 1e-16
        net[5].weight.copy_(weight)
        net[5].bias.copy_(torch.tensor([1e3, -1e3]))
    x = torch.tensor([[[[0.5, 0.25], [0.75, 0.125]]]], dtype=F64)
    spec = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], dtype=F64)
    for eps in (0.0, 2.0**-50, 1e-3):
        lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
        found = box_points(lo, hi, 0, corners=16)
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
