"""Checks shared by the graph-operator tests: hand-built ONNX files, their agreement with
onnxruntime, and the smallest value of a specification over sampled and attacked points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from certnet.falsify import falsify
from certnet.graph import Graph


def save_onnx(tmp_path: Path, nodes: list, inits: dict, in_shape: list, out_shape: list,
              opset: int = 13, name: str = "m.onnx") -> Path:
    """An ONNX file of ``nodes`` from input x to output y (float32), with initializers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, path)
    return path


def agree_with_onnxruntime(path: Path, graph: Graph, n: int = 6) -> None:
    """certnet's float64 graph gives onnxruntime's float32 outputs on random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(n, *graph.input_shape, generator=torch.Generator().manual_seed(1)).float()
    ref = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ours = graph(x.double()).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * (1 + np.abs(ref).max())


def attacked_minimum(layers: nn.Module, x: torch.Tensor, eps: float, spec: torch.Tensor
                     ) -> torch.Tensor:
    """min over sampled and PGD points of the box (clipped to [0, 1]) of spec . z (B, S)."""
    g = torch.Generator().manual_seed(5)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    noise = torch.rand(300, *x.shape, dtype=torch.float64, generator=g)
    with torch.no_grad():
        out = layers((lo + (hi - lo) * noise).flatten(0, 1)).view(300, len(x), -1)
    values = torch.einsum("nbk,bsk->nbs", out, spec).amin(0)
    for b in range(len(x)):
        for s in range(spec.shape[1]):
            _, found = falsify(layers, lo[b:b + 1], hi[b:b + 1],
                               lambda z, b=b, s=s: z @ spec[b, s], steps=20, restarts=4)
            values[b, s] = min(float(values[b, s]), found)
    return values
