"""ONNX import (certnet.graph.onnx_import): the shared VNN-COMP networks, which no one here
wrote, and small hand-built graphs of every supported operator compute what onnxruntime
computes; bad files and unsupported operators are one clear error naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.graph import INPUT, Graph, Node
from certnet.graph.onnx_import import load_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"
NETWORKS = sorted(VNNCOMP.glob("*/onnx/*.onnx")) + sorted(VNNCOMP.glob("*/nets/*.onnx"))


def _reference(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _agree(path: Path, graph: Graph, n: int = 8) -> None:
    """certnet's float64 forward and onnxruntime's float32 one agree up to float32 rounding,
    on random inputs in [0, 1] (one at a time: the shared files fix the batch at 1)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.rand(1, *graph.input_shape, generator=generator).float()
        ref = _reference(path, x)
        with torch.no_grad():
            ours = graph(x.double()).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-5 * (1 + np.abs(ref).max())


@pytest.mark.skipif(not NETWORKS, reason="no shared VNN-COMP networks here")
@pytest.mark.parametrize("path", NETWORKS, ids=lambda p: p.name)
def test_shared_networks_reproduce_onnxruntime(path):
    graph = load_onnx(path)
    _agree(path, graph)
    layers = graph.sequential()
    assert isinstance(layers, nn.Sequential) and len(layers) == len(graph.nodes)


def _save(tmp_path: Path, nodes, inits, in_shape, out_shape, name="m.onnx") -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_supported_operator_matches_onnxruntime(tmp_path):
    """Sub/Div per channel (folded into one Normalize), Conv (stride, padding), Relu,
    Reshape to (batch, -1), MatMul + Add (a Linear with bias), Gemm with transB, Identity."""
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"]),
        helper.make_node("Div", ["a", "std"], ["b"]),
        helper.make_node("Conv", ["b", "k", "kb"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Reshape", ["d", "shape"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["f"]),
        helper.make_node("Add", ["f", "b1"], ["g"]),
        helper.make_node("Identity", ["g"], ["h"]),
        helper.make_node("Relu", ["h"], ["i"]),
        helper.make_node("Gemm", ["i", "w2", "b2"], ["y"], transB=1),
    ]
    inits = {"mean": np.array([0.1, 0.2], np.float32).reshape(1, 2, 1, 1),
             "std": np.array([0.3, 0.5], np.float32).reshape(1, 2, 1, 1),
             "k": _rand(3, 2, 3, 3), "kb": _rand(3, seed=1), "shape": np.array([-1, 48]),
             "w1": _rand(48, 7, seed=2), "b1": _rand(7, seed=3), "w2": _rand(4, 7, seed=4),
             "b2": _rand(4, seed=5)}
    inits["shape"] = inits["shape"].astype(np.int64)
    graph_nodes = [n for n in nodes]
    proto_inits = [numpy_helper.from_array(v if k == "shape" else np.asarray(v, np.float32), k)
                   for k, v in inits.items()]
    model = helper.make_model(helper.make_graph(
        graph_nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], proto_inits),
        opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "all.onnx"
    onnx.save(model, path)
    graph = load_onnx(path)
    kinds = [type(node.op).__name__ for node in graph.nodes]
    assert kinds == ["Normalize", "Conv2d", "ReLU", "Flatten", "Linear", "ReLU", "Linear"]
    _agree(path, graph)


@pytest.mark.parametrize("case, message", [
    ("softmax", "operator not supported"),
    ("concat_axis", "axis 2"),
    ("dynamic_weight", "must be a constant"),
    ("alpha", "alpha=2.0 is not supported"),
    ("nan_weight", "NaN or infinite"),
])
def test_unsupported_graphs_are_refused_naming_the_node(tmp_path, case, message):
    w = _rand(4, 4)
    cases = {
        "softmax": ([helper.make_node("Softmax", ["x"], ["y"], name="sm")], {}),
        "concat_axis": ([helper.make_node("Relu", ["x"], ["a"], name="r"),
                         helper.make_node("Concat", ["a", "x"], ["y"], axis=2, name="cat")],
                        {}),
        "dynamic_weight": ([helper.make_node("MatMul", ["x", "x2"], ["y"], name="mm"),
                            ], {}),
        "alpha": ([helper.make_node("Gemm", ["x", "w"], ["y"], alpha=2.0, name="g")],
                  {"w": w}),
        "nan_weight": ([helper.make_node("Gemm", ["x", "w"], ["y"], name="g")],
                       {"w": np.full((4, 4), np.nan, np.float32)}),
    }
    nodes, inits = cases[case]
    if case == "dynamic_weight":
        nodes = [helper.make_node("Relu", ["x"], ["x2"], name="r"), *nodes]
    path = _save(tmp_path, nodes, inits, [1, 4], [1, 4])
    with pytest.raises((UnsupportedLayerError, InputError), match=message) as info:
        load_onnx(path)
    assert "ONNX node" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not an onnx file", bytes(range(256)) * 8])
def test_corrupt_files_are_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises((InputError, UnsupportedLayerError), match="bad.onnx"):
        load_onnx(path)


def test_missing_file_and_external_data_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such ONNX file"):
        load_onnx(tmp_path / "absent.onnx")
    path = _save(tmp_path, [helper.make_node("Gemm", ["x", "w"], ["y"])],
                 {"w": _rand(64, 64)}, [1, 64], [1, 64])
    model = onnx.load(path)
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    with pytest.raises((InputError, UnsupportedLayerError), match="external"):
        load_onnx(tmp_path / "ext.onnx")


def test_graph_nodes_and_chains():
    relu, lin = nn.ReLU(), nn.Linear(3, 3)
    chain = Graph.from_sequential(nn.Sequential(lin, relu), (3,))
    x = torch.randn(2, 3)
    assert torch.equal(chain(x), relu(lin(x)))
    assert list(chain.sequential()) == [lin, relu]

    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    branched = Graph([Node(lin, (INPUT,), "a"), Node(Add(), (0, INPUT), "res")], (3,))
    assert torch.equal(branched(x), lin(x) + x)
    with pytest.raises(UnsupportedLayerError, match="res takes 2 input"):
        branched.sequential()
    with pytest.raises(UnsupportedLayerError, match="not earlier nodes"):
        Graph([Node(lin, (1,), "a"), Node(relu, (0,), "b")], (3,))


def test_residual_adds_and_concatenations_are_graphs_the_engine_bounds(tmp_path):
    """x -> Gemm -> Relu -> + x -> Concat(., Relu(x)) -> Gemm: onnxruntime's outputs, and
    bounds (through the lowered chain) that contain sampled outputs."""
    from certnet.bounds.margins import spec_bounds
    from certnet.threat import ThreatModel

    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], transB=1),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Add", ["b", "x"], ["c"], name="res"),
             helper.make_node("Relu", ["x"], ["d"]),
             helper.make_node("Concat", ["c", "d"], ["e"], axis=1, name="cat"),
             helper.make_node("Gemm", ["e", "w2"], ["y"], transB=1)]
    path = _save(tmp_path, nodes, {"w1": _rand(6, 6), "b1": _rand(6, seed=1),
                                   "w2": _rand(3, 12, seed=2)}, [1, 6], [1, 3])
    graph = load_onnx(path)
    _agree(path, graph)
    with pytest.raises(UnsupportedLayerError, match="res"):
        graph.sequential()
    chain = graph.chain()
    x = torch.rand(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(chain(x), graph(x))
    spec = torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    noise = torch.rand(400, 5, 6, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1
    with torch.no_grad():
        sampled = graph((x + noise).clamp(0, 1).flatten(0, 1)).view(400, 5, 3).amin(0)
    for method in ("ibp", "crown", "alpha-crown"):
        lower = spec_bounds(chain, x, ThreatModel("linf", 0.1), spec, method, rigorous=True)
        assert (lower <= sampled).all()
