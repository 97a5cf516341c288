"""``certnet export``: ONNX networks equal to certnet's (checked by onnxruntime, and by
certnet's own ONNX reader) and VNN-LIB properties whose answers by ``certnet verify`` agree with
certnet's certificates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certnet.checkpoint import load
from certnet.cli import main
from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.export import (
    CONVERTERS,
    export_onnx,
    export_vnnlib,
    onnx_bytes,
    property_name,
    to_onnx,
)
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    trace_shapes,
)
from certnet.nn.pad import Pad
from certnet.nn.scale import Scale
from certnet.zoo import names

ort = pytest.importorskip("onnxruntime")
IBP_MODEL = "ibp-mnist-0.3-dm-medium-cpu-gowal"


def run_onnx(data: bytes, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.float().numpy()})[0]


def assert_close(onnx_out: np.ndarray, layers: nn.Module, x: torch.Tensor) -> float:
    """onnxruntime's float32 outputs against the float64 forward: |diff| <= 1e-4 (1 + |y|)."""
    with torch.no_grad():
        ref = layers.double()(x.double()).numpy()
    assert onnx_out.shape == ref.shape
    diff = np.abs(onnx_out - ref)
    assert (diff <= 1e-4 * (1 + np.abs(ref))).all(), diff.max()
    return float(diff.max())


def inputs(shape: tuple[int, ...], n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", names())
def test_every_committed_checkpoint_equals_onnxruntime(name, tmp_path):
    model = load(name)
    path = export_onnx(model, tmp_path / "net.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["net.onnx"]  # no temporary left
    assert_close(run_onnx(path.read_bytes(), inputs(model.input_shape)), model.layers,
                 inputs(model.input_shape))


def random_(module: nn.Module, seed: int) -> nn.Module:
    """Random parameters and buffers (variances positive) in place; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and "identity" not in name and "power" not in name:
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "var" in name
                        else torch.randn(t.shape, generator=gen) * 0.5)
    return module.eval()


def every_layer_type() -> tuple[nn.Sequential, tuple[int, ...]]:
    """A network with a layer of every exported type (none in a committed checkpoint has
    ResidualConv2d, AvgPool2d, BatchNorm, Tanh, ClippedMinMax or l_inf-dist convolutions)."""
    layers = nn.Sequential(
        Normalize([0.1, 0.2], [0.5, 0.7]), ResidualConv2d(2, 3, alpha=0.5), nn.BatchNorm2d(2),
        MinMax(), ClippedMinMax([2, 8, 8], -0.5, 0.5), ClippedReLU([2, 8, 8]),
        nn.AvgPool2d(3, stride=1, padding=1), nn.MaxPool2d(3, stride=1, padding=1),
        nn.LeakyReLU(0.1), nn.AvgPool2d(2),
        Pad([1, -1, -1, 1], 0.25), Scale(torch.ones(4, 4), torch.zeros(2, 1, 1)),
        LipschitzConv2d(2, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1), nn.Tanh(),
        LinfDistConv2d(4, 6, 3, padding=1, bias=True), MeanShift(6), nn.Flatten(),
        LipschitzLinear(24, 10), nn.BatchNorm1d(10), nn.Identity(), nn.Linear(10, 8),
        LinfDist(8, 6, bias=True), LinfDist(6, 5, p=1), LinfDist(5, 4, p=2), Negate(),
        Scale(torch.ones(4), divide=True))
    shape = (2, 8, 8)
    trace_shapes(layers, shape)
    return random_(layers, 1), shape


def test_every_converter_is_exercised_and_exact_to_float32():
    layers, shape = every_layer_type()
    assert {type(m) for m in layers} | {nn.ReLU} == set(CONVERTERS)  # ReLU: the checkpoints
    x = inputs(shape, 8, seed=2)
    assert_close(run_onnx(to_onnx(layers, shape).SerializeToString(), x), layers, x)


def test_networks_certnets_reader_takes_come_back_equal(tmp_path):
    """Gemm / Conv / Relu / Flatten / Sub / Div: certnet's own load_onnx reads them back, with
    the float32 weights exactly, so the float64 outputs agree to float64 rounding."""
    from certnet.graph.onnx_import import load_onnx

    ibp = load(IBP_MODEL)
    normalized = nn.Sequential(Normalize([0.1307], [0.3081]), *ibp.layers)
    for layers in (ibp.layers, normalized):
        path = tmp_path / "net.onnx"
        path.write_bytes(to_onnx(layers, ibp.input_shape).SerializeToString())
        graph = load_onnx(path)
        x = inputs(ibp.input_shape).double()
        with torch.no_grad():
            back, ref = graph(x), layers.double()(x)
        assert torch.allclose(back, ref, rtol=1e-10, atol=1e-10)


def test_unknown_and_unexportable_layers_are_refused():
    class MyReLU(nn.ReLU):  # a subclass may change forward: never taken as its parent
        pass

    for layer, text in ((nn.GELU(), "GELU"), (MyReLU(), "MyReLU")):
        with pytest.raises(UnsupportedLayerError, match=f"layer 1 \\({text}\\)"):
            to_onnx(nn.Sequential(nn.Flatten(), layer), (4,))
    with pytest.raises(UnsupportedLayerError, match="layer 0: .*LinfDist.*p = 8"):
        to_onnx(nn.Sequential(LinfDist(4, 3, p=8)), (4,))
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        to_onnx(nn.Sequential(nn.BatchNorm1d(4)), (4,))


def test_onnx_write_is_atomic(tmp_path, monkeypatch):
    model = load("gloro-mnist-0.3-2c2f")

    def torn(fd: int) -> None:  # the bytes are in the temporary file: fail before the rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", torn)
    with pytest.raises(OSError, match="No space"):
        export_onnx(model, tmp_path / "net.onnx")
    assert list(tmp_path.iterdir()) == []


def test_vnnlib_refuses_l2_and_writes_all_or_nothing(tmp_path, monkeypatch):
    model = load(IBP_MODEL)
    x, labels = inputs(model.input_shape, 3), [1, 2, 3]
    with pytest.raises(ConfigError, match="no box is an l2 ball"):
        export_vnnlib(model, x, labels, 1.0, tmp_path / "props", norm="l2")
    import certnet.export as export

    real, calls = export.atomic_write, []

    def failing(path, data) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(export, "atomic_write", failing)
    with pytest.raises(OSError):
        export_vnnlib(model, x, labels, 0.1, tmp_path / "props")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling


def test_vnnlib_files_state_the_linf_ball(tmp_path):
    from certnet.properties import read_instances, read_vnnlib

    model = load(IBP_MODEL)
    x = inputs(model.input_shape, 2)
    out = export_vnnlib(model, x, [4, 9], 0.25, tmp_path / "props", indices=[7, 11],
                        timeout_s=30)
    rows = read_instances(out / "instances.csv")
    assert [(r.onnx.name, r.vnnlib.name, r.timeout_s) for r in rows] == [
        ("model.onnx", property_name(7, 0.25), 30.0), ("model.onnx", "prop_11_0.25.vnnlib", 30.0)]
    prop = read_vnnlib(rows[1].vnnlib)
    lo, hi = prop.box_tensors()
    assert torch.equal(lo, (x[1].double().flatten() - 0.25).clamp(0, 1))
    assert torch.equal(hi, (x[1].double().flatten() + 0.25).clamp(0, 1))
    assert len(prop.cases[0].violation) == 9  # Y_j >= Y_9 for every other class j
    # an earlier export is replaced; a folder with other files is not touched
    export_vnnlib(model, x[:1], [4], 0.25, out)
    assert sorted(p.name for p in out.iterdir()) == ["instances.csv", "model.onnx",
                                                      "prop_0_0.25.vnnlib"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        export_vnnlib(model, x[:1], [4], 0.25, out)
    assert (out / "notes.txt").read_text() == "mine"


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "props"
    cases = [
        (["export", IBP_MODEL], "nothing to export"),
        (["export", IBP_MODEL, "--onnx", str(tmp_path / "no" / "net.onnx")], "cannot write"),
        (["export", "gloro-mnist-0.3-2c2f", "--vnnlib", str(out)], "no box is an l2 ball"),
        (["export", "gloro-mnist-0.3-2c2f", "--vnnlib", str(out), "--norm", "linf"],
         "no linf radius; pass --eps"),
    ]
    for argv, text in cases:
        assert main(argv) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_cli_onnx(tmp_path, capsys):
    path = tmp_path / "net.onnx"
    assert main(["export", "gloro-mnist-1.58-2c2f-crelu-cpu", "--onnx", str(path)]) == 0
    model = load("gloro-mnist-1.58-2c2f-crelu-cpu")
    assert path.read_bytes() == onnx_bytes(model)  # deterministic
    x = inputs(model.input_shape)
    assert_close(run_onnx(path.read_bytes(), x), model.layers, x)


def test_exported_properties_agree_with_certnets_certificates(tmp_path, capsys,
                                                              mnist_available):
    """``certnet export --vnnlib`` then ``certnet verify --instances``: a point certnet
    certifies (for its true label) is never ``sat``; one it certifies for another class (the
    box then holds a counterexample: the point itself) is never ``unsat``."""
    from certnet.data import load_dataset

    out, report = tmp_path / "props", tmp_path / "verify.json"
    assert main(["export", IBP_MODEL, "--vnnlib", str(out), "--points", "3"]) == 0
    assert main(["verify", "--instances", str(out / "instances.csv"), "--certifier", "ibp",
                 "--json", str(report)]) == 0
    rows = json.loads(report.read_text())["instances"]
    model = load(IBP_MODEL)
    data = load_dataset("mnist", "test")
    cert = model.certify(data.images(slice(0, 3)), model.checkpoint_config["eps"])
    assert [Path(r["vnnlib"]).name for r in rows] == [property_name(i, 0.3) for i in range(3)]
    for i, row in enumerate(rows):
        assert row["result"] in ("unsat", "sat", "unknown", "timeout"), row
        if bool(cert.certified[i]):
            correct = int(cert.pred[i]) == int(data.y[i])
            assert row["result"] != ("sat" if correct else "unsat"), (i, row)
    assert bool(cert.certified.all())  # this model certifies all 3: so do the instances
    assert [r["result"] for r in rows] == ["unsat"] * 3
