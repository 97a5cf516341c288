"""The operators of issue 27 beyond dense/conv/ReLU: ONNX BatchNormalization, AveragePool,
GlobalAveragePool, Tanh, Neg, Clip and the reshape-only Reshape/Squeeze/Unsqueeze/Transpose
compute what onnxruntime computes; certnet's own exports of MinMax, ClippedMinMax, ClippedReLU,
l_inf-dist and mean shifts come back as those layers, with the same weights; torch.fx reads
F.avg_pool2d and reshapes that keep the batch. Each graph's bounds contain sampled outputs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from exact import ExactNet
from graph_checks import agree_with_onnxruntime, save_onnx
from torch import nn

import certnet
from certnet.bounds.margins import spec_bounds
from certnet.errors import UnsupportedLayerError
from certnet.export import to_onnx
from certnet.graph import Graph
from certnet.graph.fx_import import from_module
from certnet.graph.onnx_import import load_onnx
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, trace_shapes
from certnet.nn.reshape import Reshape
from certnet.threat import ThreatModel
from certnet.verify.lowering import network_ops

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _contains_samples(layers: nn.Module, shape: tuple[int, ...], eps: float = 0.02,
                      methods: tuple[str, ...] = ("ibp", "crown"), seed: int = 0) -> None:
    """Rigorous and plain bounds of random specifications lie below every sampled value (of
    the box clipped to [0, 1], as the threat model clips it)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, *shape, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        classes = layers(x).shape[1]
        spec = torch.randn(2, 3, classes, dtype=torch.float64, generator=generator)
        noise = (torch.rand(200, *x.shape, dtype=torch.float64, generator=generator) * 2 - 1)
        outputs = layers((x + eps * noise).clamp(0, 1).flatten(0, 1)).view(200, 2, classes)
    values = torch.einsum("nbk,bsk->nbs", outputs, spec).amin(0)
    for method in methods:
        for rigorous in (False, True):
            bound = spec_bounds(layers, x, ThreatModel("linf", eps), spec, method,
                                rigorous=rigorous)
            assert (bound <= values).all(), (method, rigorous)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def _rand(*shape: int, seed: int = 0, low: float | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, low + 1, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def test_new_onnx_operators_match_onnxruntime_and_bounds_hold(tmp_path):
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["a"], epsilon=1e-3),
        helper.make_node("Conv", ["a", "k"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["c"], ["d"]),
        helper.make_node("AveragePool", ["d"], ["e"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Neg", ["e"], ["f"]),  # (N, 4, 3, 3)
        helper.make_node("Reshape", ["f", "r1"], ["g"]),  # (N, 4, 9)
        helper.make_node("Unsqueeze", ["g", "ax2"], ["h"]),  # (N, 4, 1, 9)
        helper.make_node("Transpose", ["h"], ["i"], perm=[0, 2, 1, 3]),  # (N, 1, 4, 9)
        helper.make_node("Squeeze", ["i", "ax1"], ["j"]),  # (N, 4, 9)
        helper.make_node("Reshape", ["j", "r2"], ["k2"]),  # (N, 4, 3, 3)
        helper.make_node("Relu", ["k2"], ["l"]),
        helper.make_node("AveragePool", ["l"], ["l2"], kernel_shape=[2, 2]),  # (N, 4, 2, 2)
        helper.make_node("GlobalAveragePool", ["l2"], ["n"]),  # (N, 4, 1, 1)
        helper.make_node("Flatten", ["n"], ["o"]),
        helper.make_node("Gemm", ["o", "w1"], ["p"], transB=1),
        helper.make_node("BatchNormalization", ["p", "s1", "b1", "m1", "v1"], ["q"]),
        helper.make_node("Clip", ["q", "zero", "top"], ["q2"]),
        helper.make_node("Clip", ["q2", "zero"], ["q3"]),
        helper.make_node("Gemm", ["q3", "w2"], ["y"], transB=1)]
    inits = {"s": _rand(2), "b": _rand(2, seed=1), "m": _rand(2, seed=2),
             "v": _rand(2, seed=3, low=0.5), "k": _rand(4, 2, 3, 3, seed=4),
             "r1": _ints(0, 4, -1), "ax2": _ints(2), "ax1": _ints(-3), "r2": _ints(-1, 4, 3, 3),
             "w1": _rand(6, 4, seed=5), "s1": _rand(6, seed=6), "b1": _rand(6, seed=7),
             "m1": _rand(6, seed=8), "v1": _rand(6, seed=9, low=0.5),
             "zero": np.array(0, np.float32), "top": np.array(0.75, np.float32),
             "w2": _rand(3, 6, seed=11)}
    path = save_onnx(tmp_path, nodes, inits, ["N", 2, 6, 6], ["N", 3])
    graph = load_onnx(path)
    assert [type(node.op).__name__ for node in graph.nodes] == [
        "BatchNorm2d", "Conv2d", "Tanh", "AvgPool2d", "Negate", "Reshape", "Reshape",
        "Reshape", "Reshape", "Reshape", "ReLU", "AvgPool2d", "AvgPool2d", "Flatten", "Linear",
        "BatchNorm1d", "ClippedReLU", "ReLU", "Linear"]
    assert graph.nodes[12].op.kernel_size == (2, 2) and graph.nodes[0].op.eps == \
        pytest.approx(1e-3)
    agree_with_onnxruntime(path, graph)
    _contains_samples(graph.chain(), graph.input_shape)


@pytest.mark.parametrize("case, message", [
    ("transpose", r"moves data"),
    ("pool_pads", r"count_include_pad=0"),
    ("ceil", r"ceil_mode=1"),
    ("training", r"training_mode=1"),
    ("squeeze_all", r"without constant axes"),
    ("squeeze_batch", r"never the batch"),
    ("reshape_batch", r"first dimension must stay the batch"),
    ("clip_low", r"lower end other than 0"),
    ("domain", r"domain com.other"),
])
def test_operators_outside_the_rules_are_refused(tmp_path, case, message):
    x4 = ["N", 2, 4, 4]
    cases = {
        "transpose": (helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1, 3, 2]), {}),
        "pool_pads": (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                       pads=[1, 1, 1, 1]), {}),
        "ceil": (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                  ceil_mode=1), {}),
        "training": (helper.make_node("BatchNormalization", ["x", "s", "s", "s", "s"], ["y"],
                                      training_mode=1), {"s": _rand(2, low=0.5)}),
        "squeeze_all": (helper.make_node("Squeeze", ["x"], ["y"]), {}),
        "squeeze_batch": (helper.make_node("Squeeze", ["x", "a"], ["y"]), {"a": _ints(0)}),
        "reshape_batch": (helper.make_node("Reshape", ["x", "r"], ["y"]),
                          {"r": _ints(2, -1)}),
        "clip_low": (helper.make_node("Clip", ["x", "c"], ["y"]),
                     {"c": np.array(-1, np.float32)}),
        "domain": (helper.make_node("Relu", ["x"], ["y"], domain="com.other"), {}),
    }
    node, inits = cases[case]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x4)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x4)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 15), helper.make_opsetid("com.other", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(UnsupportedLayerError, match=message):
        load_onnx(path)


def _exported(layers: nn.Sequential, shape: tuple[int, ...], tmp_path) -> Graph:
    path = tmp_path / "net.onnx"
    path.write_bytes(to_onnx(layers, shape).SerializeToString())
    return load_onnx(path)


def _same_layers(graph: Graph, layers: nn.Sequential, shape: tuple[int, ...]) -> None:
    """The read-back graph has the layers' own types (plain ones for Lipschitz layers) and
    their float32 parameters exactly, and computes their float64 function exactly."""
    plain = {LipschitzConv2d: nn.Conv2d, LipschitzLinear: nn.Linear}
    assert [type(n.op) for n in graph.nodes] == [plain.get(type(m), type(m)) for m in layers]
    for node, m in zip(graph.nodes, layers, strict=True):
        ours = dict(node.op.state_dict())
        for key, value in m.state_dict().items():
            if key in ours:
                assert torch.equal(ours[key], value.double()), (type(m).__name__, key)
    x = torch.rand(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(graph(x), layers.double()(x))


def _random(layers: nn.Sequential, shape: tuple[int, ...]) -> nn.Sequential:
    trace_shapes(layers, shape)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*layers.named_parameters(), *layers.named_buffers()]:
            if t.is_floating_point() and "power" not in name:
                t.copy_(torch.randn(t.shape, generator=generator) * 0.5)
    return layers.float().eval()


def test_certnet_exports_of_sorting_and_clipped_activations_come_back(tmp_path):
    shape = (2, 6, 6)
    layers = _random(nn.Sequential(
        LipschitzConv2d(2, 4, 3, padding=1), MinMax(), ClippedMinMax([4, 6, 6], -0.5, 0.5),
        ClippedReLU([4, 6, 6]), nn.Flatten(), LipschitzLinear(144, 8), MinMax(),
        LipschitzLinear(8, 3)), shape)
    graph = _exported(layers, shape, tmp_path)
    _same_layers(graph, layers, shape)
    _contains_samples(graph.chain(), shape)


def test_certnet_exports_of_linf_dist_nets_come_back(tmp_path):
    shape = (6,)
    layers = _random(nn.Sequential(LinfDist(6, 8), MeanShift(8), LinfDist(8, 5, p=2),
                                   LinfDist(5, 3, bias=True), Negate()), shape)
    graph = _exported(layers, shape, tmp_path)
    _same_layers(graph, layers, shape)
    assert [n.op.p for n in graph.nodes if type(n.op) is LinfDist] == [float("inf"), 2.0,
                                                                       float("inf")]
    _contains_samples(graph.chain(), shape, methods=("ibp",))


def test_certnet_exports_of_linf_dist_conv_nets_come_back(tmp_path):
    """The convolutional l_p-dist layer's export (one-hot patch Conv, then the distance
    group) reads back as that layer, strides, padding, p and bias included."""
    shape = (2, 7, 7)
    layers = _random(nn.Sequential(LinfDistConv2d(2, 4, 3, stride=2, padding=1),
                                   MeanShift(4), LinfDistConv2d(4, 3, 2, p=2, bias=True),
                                   nn.Flatten(), LinfDist(27, 3)), shape)
    graph = _exported(layers, shape, tmp_path)
    # an image's mean shift reads back as the per-channel Normalize computing the same
    assert [type(n.op) for n in graph.nodes] == [LinfDistConv2d, Normalize, LinfDistConv2d,
                                                 nn.Flatten, LinfDist]
    x = torch.rand(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(graph(x), layers.double()(x))
    convs = [n.op for n in graph.nodes if type(n.op) is LinfDistConv2d]
    assert [(c.kernel_size, c.stride, c.padding, c.p, c.bias is not None) for c in convs] == \
        [(3, 2, 1, float("inf"), False), (2, 1, 0, 2.0, True)]
    _contains_samples(graph.chain(), shape, methods=("ibp",))


def test_the_gloro_checkpoint_comes_back_from_its_export(tmp_path):
    model = certnet.load("gloro-mnist-0.3-2c2f")
    graph = _exported(model.layers, model.input_shape, tmp_path)
    _same_layers(graph, model.layers, model.input_shape)


class Pooled(nn.Module):
    """F.avg_pool2d and reshapes that keep the batch, in three spellings."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2, stride=2)  # (B, 4, 3, 3)
        h = h.view(h.size(0), 2, -1).relu()  # (B, 2, 18)
        h = h.reshape(h.shape[0], 4, 3, 3).flatten(2)  # (B, 4, 9)
        h = F.avg_pool2d(h.view(-1, 4, 3, 3), 3, 1, 1)
        return self.fc(F.avg_pool2d(h, 2, 1).flatten(1))


def test_fx_reads_avg_pool_and_batch_keeping_reshapes():
    torch.manual_seed(0)
    net = Pooled().double().eval()
    graph = from_module(net, (1, 6, 6))
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Conv2d", "Tanh", "AvgPool2d", "Reshape", "ReLU", "Reshape", "Reshape", "Reshape",
        "AvgPool2d", "AvgPool2d", "Flatten", "Linear"]
    assert graph.nodes[3].op.shape == (2, 18)
    _contains_samples(graph.chain(), (1, 6, 6))


@pytest.mark.parametrize(("step", "error"), [
    (lambda h: h.view(h.size(0), h.size(0), -1), "a reshape to"),
    (lambda h: F.adaptive_avg_pool2d(h, 1), "not supported"),
    (lambda h: F.elu(h), "not supported"),
    (lambda h: F.avg_pool2d(h, 3, padding=1, count_include_pad=False), "count_include_pad"),
])
def test_fx_refuses_what_the_rules_do_not_cover(step, error):
    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return step(self.conv(x)).relu()

    with pytest.raises(UnsupportedLayerError, match=error):
        from_module(Tail().eval(), (1, 8, 8))


def test_reshape_is_exact_in_every_rule():
    """Rigorous bounds hold in exact arithmetic through Reshape; the verifier's lowering
    passes it through."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Reshape([2, 3]), MinMax(),
                           Reshape([6]), nn.Linear(6, 2)).double()
    ops, out = network_ops(layers, (4,))
    assert out == (2,) and [op[0] for op in ops] == ["affine", "relu", "minmax", "affine"]
    x = torch.tensor([[0.25, 0.5, 0.375, 0.75]], dtype=torch.float64)
    spec = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    lower = spec_bounds(layers, x, ThreatModel("linf", 0.125), spec, "crown", rigorous=True)
    exact = ExactNet(layers)
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = exact(x[0].numpy() + 0.125 * rng.choice([-1.0, 1.0, 0.5], 4))
        assert Fraction(float(lower[0, 0].detach())) <= z[0] - z[1]


def test_a_softmax_is_refused_with_what_to_do(tmp_path):
    """ONNX and torch.fx alike: a final softmax is named, with the advice to bound logits."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "sm.onnx")
    with pytest.raises(UnsupportedLayerError, match="'sm' \\(Softmax\\).*logits"):
        load_onnx(tmp_path / "sm.onnx")

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.softmax(self.fc(x), 1)

    with pytest.raises(UnsupportedLayerError, match="softmax.*logits"):
        from_module(Classifier().eval(), (3,))
    with pytest.raises(UnsupportedLayerError, match="Softmax.*logits"):
        from_module(nn.Sequential(nn.Linear(3, 3), nn.Softmax(1)).eval(), (3,))
