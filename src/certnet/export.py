"""Export a certnet network and its robustness properties for other verifiers: the network as
ONNX (:func:`export_onnx`) and ℓ∞ robustness properties of chosen points as VNN-LIB files with a
VNN-COMP ``instances.csv`` (:func:`export_vnnlib`), so certnet's certificates can be re-checked
by any verifier that reads VNN-COMP benchmarks (``certnet export``).

The ONNX graph is built directly with ``onnx.helper`` (opset 17, IR version 8) from the
layers' float32 weights; ``torch.onnx.export`` is not used (in torch 2.13 its default
exporter needs onnxscript, and the legacy TorchScript one, ``dynamo=False``, is deprecated). The
converters are one table, :data:`CONVERTERS` (exact layer class -> converter); a layer of
another type is refused (:class:`certnet.errors.UnsupportedLayerError`), never approximated.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certnet import __version__
from certnet.checkpoint import _write_directory
from certnet.errors import ConfigError, InputError, UnsupportedLayerError
from certnet.files import UMASK, atomic_write
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.layer_types import layer_type
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate, patch_kernel
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, ResidualConv2d
from certnet.nn.pad import Pad, check_padding, pad_of
from certnet.nn.scale import Scale

#: the ONNX operator set and IR version written (onnxruntime >= 1.13 and most verifiers)
OPSET, IR_VERSION = 17, 8
#: names of the graph's input and output
INPUT, OUTPUT = "input", "output"
#: the network file :func:`export_vnnlib` writes when it is given none
MODEL_NAME = "model.onnx"
#: files an export directory holds (anything else there: the directory is not replaced)
_EXPORT_FILE = re.compile(r"(model\.onnx|instances\.csv|prop_\d+_[^/]*\.vnnlib)\Z")


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise UnsupportedLayerError("writing ONNX needs the onnx package: pip install "
                                    "'certnet[onnx]'") from err
    return onnx


class _Builder:
    """The ONNX graph under construction: nodes, initializers and fresh names."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: torch.Tensor | np.ndarray, hint: str, dtype: Any = np.float32
              ) -> str:
        """An initializer holding ``value`` as ``dtype`` (float32: the weights' float32 values,
        float64 ones rounded to nearest); its name."""
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(
            np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str = "", **attrs: Any) -> str:
        """Append one ``op`` node reading ``inputs``; the name of its output."""
        out = self.name(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


#: converter(layer, input name, one input's shape (no batch), builder) -> output name
Converter = Callable[[Any, str, tuple[int, ...], _Builder], str]


def _refuse(m: nn.Module, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(f"cannot export {type(m).__name__} to ONNX: {why}")


def _gemm(m: nn.Linear, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    inputs = [x, g.const(m.weight, "weight")]
    if m.bias is not None:
        inputs.append(g.const(m.bias, "bias"))
    return g.node("Gemm", inputs, "gemm", transB=1)


def _conv_node(m: nn.Conv2d, kernel: torch.Tensor, x: str, g: _Builder) -> str:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise _refuse(m, f"padding {m.padding!r} ({m.padding_mode}); integer zero padding only")
    inputs = [x, g.const(kernel, "kernel")]
    if m.bias is not None:
        inputs.append(g.const(m.bias, "bias"))
    return g.node("Conv", inputs, "conv", kernel_shape=list(kernel.shape[2:]),
                  strides=list(m.stride), pads=list(m.padding) * 2,
                  dilations=list(m.dilation), group=m.groups)


def _conv(m: nn.Conv2d, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    return _conv_node(m, m.weight, x, g)


def _residual_conv(m: ResidualConv2d, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """The folded block's effective kernel alpha W + I, computed in float64 and rounded once."""
    kernel = m.alpha * m.weight.detach().double() + m.identity_kernel.double()
    return _conv_node(m, kernel, x, g)


def _normalize(m: Normalize, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    return g.node("Div", [g.node("Sub", [x, g.const(m.mean, "mean")]), g.const(m.std, "std")])


def _flatten(m: nn.Flatten, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    if m.start_dim != 1 or m.end_dim not in (-1, len(shape)):
        raise _refuse(m, f"start_dim={m.start_dim}, end_dim={m.end_dim}; only (batch, -1)")
    return g.node("Flatten", [x], axis=1)


def _unary(op: str) -> Converter:
    return lambda m, x, shape, g: g.node(op, [x])


def _avgpool(m: nn.AvgPool2d, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    if m.ceil_mode or m.divisor_override is not None:
        raise _refuse(m, "ceil_mode and divisor_override are not exported")

    def pair(v: Any) -> list[int]:
        return [int(v)] * 2 if isinstance(v, int) else [int(e) for e in v]
    pads = pair(m.padding)
    return g.node("AveragePool", [x], kernel_shape=pair(m.kernel_size),
                  strides=pair(m.stride or m.kernel_size), pads=pads * 2,
                  count_include_pad=int(m.count_include_pad))


def _maxpool(m: nn.MaxPool2d, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """MaxPool: ONNX, as torch, takes the max over each window's inputs inside the map."""
    if m.ceil_mode or m.return_indices:
        raise _refuse(m, "ceil_mode and return_indices are not exported")

    def pair(v: Any) -> list[int]:
        return [int(v)] * 2 if isinstance(v, int) else [int(e) for e in v]
    return g.node("MaxPool", [x], kernel_shape=pair(m.kernel_size),
                  strides=pair(m.stride or m.kernel_size), pads=pair(m.padding) * 2,
                  dilations=pair(m.dilation))


def _leaky_relu(m: nn.LeakyReLU, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """LeakyRelu: its slope becomes a float32 attribute (rounded to nearest, as the weights)."""
    return g.node("LeakyRelu", [x], alpha=float(m.negative_slope))


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, x: str, shape: tuple[int, ...],
               g: _Builder) -> str:
    """Eval mode: normalised by the running statistics (a checkpoint's BatchNorm has them)."""
    if m.running_mean is None or m.running_var is None:
        raise _refuse(m, "no running statistics (it normalises by the batch)")
    ones = torch.ones(m.num_features)
    weight = m.weight if m.weight is not None else ones
    bias = m.bias if m.bias is not None else torch.zeros(m.num_features)
    return g.node("BatchNormalization", [x, g.const(weight, "bn_scale"), g.const(bias, "bn_bias"),
                                         g.const(m.running_mean, "bn_mean"),
                                         g.const(m.running_var, "bn_var")],
                  "batchnorm", epsilon=float(m.eps))


def _halves(x: str, shape: tuple[int, ...], g: _Builder) -> tuple[str, str]:
    """The two channel halves (dim 1) of ``x``: MinMax pairs channel c with c + C/2."""
    half = shape[0] // 2
    sizes = g.const(np.array([half, half]), "split", np.int64)
    low, high = g.name("low"), g.name("high")
    g.nodes.append(g.onnx.helper.make_node("Split", [x, sizes], [low, high], name=low, axis=1))
    return low, high


def _minmax(m: MinMax, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """cat(min(a, b), max(a, b)) of the halves a, b along the channels (its forward)."""
    if shape[0] % 2:
        raise _refuse(m, f"an odd number of channels ({shape[0]})")
    a, b = _halves(x, shape, g)
    return g.node("Concat", [g.node("Min", [a, b]), g.node("Max", [a, b])], axis=1)


def _clipped_minmax(m: ClippedMinMax, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """cat(max(min(a, b), lower), min(max(a, b), upper)) (its forward)."""
    a, b = _halves(x, shape, g)
    low = g.node("Max", [g.node("Min", [a, b]), g.const(m.lower, "lower")])
    high = g.node("Min", [g.node("Max", [a, b]), g.const(m.upper, "upper")])
    return g.node("Concat", [low, high], axis=1)


def _clipped_relu(m: ClippedReLU, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """clamp(min(x, t), 0) (its forward): Min with the thresholds, then Clip at 0 from below."""
    zero = g.const(np.array(0.0), "zero")
    return g.node("Clip", [g.node("Min", [x, g.const(m.threshold, "threshold")]), zero])


#: l_p-dist norms with a standard reduction: p -> ONNX reduce operator over |x - w|
_DIST_REDUCE = {math.inf: "ReduceMax", 1.0: "ReduceL1", 2.0: "ReduceL2"}


def _distance(m: LinfDist | LinfDistConv2d, rows: str, w_shape: tuple[int, ...],
              g: _Builder) -> str:
    """||rows - w_o||_p over axis 2 of Unsqueeze(rows, 1) - W (W reshaped to ``w_shape``)."""
    if m.p not in _DIST_REDUCE:
        raise _refuse(m, f"p = {m.p:g}: only p = inf (inference), 1 or 2 have a standard "
                      "ONNX reduction")
    axis = g.const(np.array([1]), "axis", np.int64)
    diff = g.node("Sub", [g.node("Unsqueeze", [rows, axis]),
                          g.const(m.weight.reshape(w_shape), "weight")])
    return g.node(_DIST_REDUCE[m.p], [g.node("Abs", [diff])], "dist", axes=[2], keepdims=0)


def _linf_dist(m: LinfDist, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """u_o = ||x - w_o||_p (+ b_o): (B, 1, in) - (out, in), |.|, reduced over in."""
    u = _distance(m, x, tuple(m.weight.shape), g)
    return u if m.bias is None else g.node("Add", [u, g.const(m.bias, "bias")])


def _linf_dist_conv(m: LinfDistConv2d, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """Patches by a convolution with one-hot kernels (exact: one product by 1 per output, as
    unfold's C * k * k order), then the distance to each filter at every position."""
    c, k = m.in_channels, m.kernel_size
    patches = g.node("Conv", [x, g.const(patch_kernel(c, k), "patch_kernel")], "patches",
                     kernel_shape=[k, k], strides=[m.stride] * 2, pads=[m.padding] * 4)
    u = _distance(m, patches, (m.out_channels, c * k * k, 1, 1), g)
    return u if m.bias is None else g.node("Add", [u, g.const(m.bias.view(-1, 1, 1), "bias")])


def _mean_shift(m: MeanShift, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """Eval mode: x - running_mean per channel (dim 1)."""
    mean = m.running_mean.reshape(-1, *[1] * (len(shape) - 1))
    return g.node("Sub", [x, g.const(mean, "running_mean")])


def _scale(m: Scale, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """x * w (Mul) or x / w (Div), then + b (Add): its forward's two operations, w and b
    rounded to float32 as the weights are (refused where that overflows, or zeroes a
    divisor)."""
    m.operands(torch.zeros(1, *shape))
    for t in (m.weight, m.bias):
        if t is not None and not bool(torch.isfinite(t.detach().float()).all()):
            raise _refuse(m, "a constant beyond float32's range")
    y = x
    if m.weight is not None:
        if m.divide and bool((m.weight.detach().float() == 0).any()):
            raise _refuse(m, "a divisor that rounds to 0 in float32")
        y = g.node("Div" if m.divide else "Mul", [y, g.const(m.weight, "scale")])
    if m.bias is not None:
        y = g.node("Add", [y, g.const(m.bias, "shift")])
    return y if y != x else g.node("Identity", [x])


def _pad(m: Pad, x: str, shape: tuple[int, ...], g: _Builder) -> str:
    """Pad in constant mode: F.pad's (before, after) pairs from the last axis backwards
    become ONNX's begins then ends of every axis (the batch's 0); the value in float32."""
    padding, value = pad_of(m)
    check_padding(padding, (1, *shape))
    rank = len(shape) + 1
    begins, ends = [0] * rank, [0] * rank
    for k in range(len(padding) // 2):
        begins[rank - 1 - k], ends[rank - 1 - k] = padding[2 * k], padding[2 * k + 1]
    pads = g.const(np.array(begins + ends), "pads", np.int64)
    return g.node("Pad", [x, pads, g.const(np.array(value), "pad_value")], mode="constant")


#: exact layer class -> converter (a subclass may change ``forward``: never matched)
CONVERTERS: dict[type[nn.Module], Converter] = {
    nn.Linear: _gemm, LipschitzLinear: _gemm,
    nn.Conv2d: _conv, LipschitzConv2d: _conv, ResidualConv2d: _residual_conv,
    Normalize: _normalize, nn.Flatten: _flatten, nn.ReLU: _unary("Relu"),
    nn.Identity: _unary("Identity"), nn.Tanh: _unary("Tanh"), Negate: _unary("Neg"),
    nn.AvgPool2d: _avgpool, nn.MaxPool2d: _maxpool, nn.LeakyReLU: _leaky_relu,
    nn.BatchNorm1d: _batchnorm, nn.BatchNorm2d: _batchnorm,
    MinMax: _minmax, ClippedReLU: _clipped_relu, ClippedMinMax: _clipped_minmax,
    LinfDist: _linf_dist, LinfDistConv2d: _linf_dist_conv, MeanShift: _mean_shift,
    Pad: _pad, Scale: _scale,
}


def to_onnx(layers: nn.Sequential, input_shape: Sequence[int], doc: str = "") -> Any:
    """The ``onnx.ModelProto`` of the eval-mode network ``layers`` on inputs of shape
    (batch, *input_shape), float32, checked by ``onnx.checker``."""
    onnx = _onnx()
    helper, g = onnx.helper, _Builder()
    shape = tuple(int(d) for d in input_shape)
    param = next(layers.parameters(), None)
    example = torch.zeros(1, *shape, dtype=param.dtype if param is not None else torch.float32)
    name = INPUT
    with torch.no_grad():
        for i, layer in enumerate(layers):
            convert = CONVERTERS.get(type(layer))
            if convert is None:
                raise UnsupportedLayerError(
                    f"layer {i} ({type(layer).__name__}) has no ONNX converter; exported types: "
                    f"{', '.join(sorted({c.__name__ for c in CONVERTERS}))}")
            known = layer_type(layer)
            if layer.training and known is not None and known.batch_statistics:
                raise _refuse(layer, "in training mode it normalises by the batch (call "
                              ".eval() first)")
            try:
                name = convert(layer, name, tuple(example.shape[1:]), g)
            except UnsupportedLayerError as err:
                raise UnsupportedLayerError(f"layer {i}: {err}") from None
            example = layer(example)
    g.nodes.append(helper.make_node("Identity", [name], [OUTPUT], name=OUTPUT))
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        g.nodes, "certnet", [helper.make_tensor_value_info(INPUT, float32, ["batch", *shape])],
        [helper.make_tensor_value_info(OUTPUT, float32, ["batch", *example.shape[1:]])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="certnet", producer_version=__version__,
                              doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_bytes(model: Any) -> bytes:
    """The serialized ONNX file of a loaded certnet model (``model.layers``,
    ``model.input_shape``)."""
    config = getattr(model, "checkpoint_config", None) or {}
    doc = (f"certnet {getattr(model, 'method', '')} network"
           + "".join(f", {k} {config[k]}" for k in ("norm", "eps", "dataset") if config.get(k)))
    return to_onnx(model.layers, model.input_shape, doc).SerializeToString()


def export_onnx(model: Any, path: str | os.PathLike) -> Path:
    """Write the network of a loaded certnet model as an ONNX file, atomically (the whole file
    or none); returns the path. Outputs equal certnet's float forward to float32 rounding."""
    path = Path(path)
    atomic_write(path, onnx_bytes(model))
    return path


def check_export_dir(out_dir: str | os.PathLike) -> Path:
    """ConfigError unless ``out_dir`` can become an export directory: inside a writable folder
    (missing parents are created), and ``out_dir`` missing, or a folder holding only files of
    an earlier export (model.onnx, instances.csv, prop_*.vnnlib), which it replaces."""
    out = Path(out_dir)
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"--vnnlib {out}: cannot write into {existing} (not a writable "
                          "folder); nothing was computed")
    out.parent.mkdir(parents=True, exist_ok=True)  # like train --out, missing parents appear
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--vnnlib {out} exists and is not a folder")
        foreign = sorted(p.name for p in out.iterdir() if not _EXPORT_FILE.match(p.name))
        if foreign:
            raise ConfigError(f"--vnnlib {out} holds files that are not an earlier export's "
                              f"({', '.join(foreign[:3])}...); choose a new or empty folder")
    return out


def property_name(index: int, eps: float) -> str:
    """``prop_{index}_{eps}.vnnlib`` (eps as %g: the file itself holds the exact radius)."""
    return f"prop_{index}_{eps:g}.vnnlib"


def export_vnnlib(model: Any, points: torch.Tensor, labels: Sequence[int] | torch.Tensor,
                  eps: float, out_dir: str | os.PathLike, norm: str = "linf", *,
                  indices: Sequence[int] | None = None, onnx: str | os.PathLike | None = None,
                  timeout_s: float = 60.0, lo: float = 0.0, hi: float = 1.0) -> Path:
    """Write ℓ∞ robustness properties (:func:`certnet.properties.linf_robustness`: the box
    clip([x - eps, x + eps], lo, hi), violated if another class scores at least ``labels[i]``)
    of ``points`` into ``out_dir`` as ``prop_{index}_{eps}.vnnlib`` files, with an
    ``instances.csv`` (rows ``onnx,vnnlib,timeout_s`` relative to it) naming the network
    ``onnx`` (None: ``model``'s network, written as ``out_dir/model.onnx``). ``indices`` name
    the points (default 0, 1, ...). The folder appears whole or not at all (see
    :func:`check_export_dir`). l2 is refused: a VNN-LIB input set is a box, and no box is the
    l2 ball (an inscribed or circumscribed box is another property). Returns ``out_dir``."""
    from certnet.properties import format_vnnlib, linf_robustness

    if norm != "linf":
        raise ConfigError(f"VNN-LIB properties are exported in linf only, not {norm}: a "
                          "VNN-LIB input set is a box, and no box is an l2 ball (a box inside or "
                          "around it states another property); pass an l_inf radius (--norm "
                          "linf --eps E)")
    if not (math.isfinite(eps) and eps >= 0) or not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"need a finite eps >= 0 and timeout > 0, got {eps} and {timeout_s}")
    labels = [int(v) for v in labels]
    indices = list(range(len(points))) if indices is None else [int(i) for i in indices]
    if not len(points) == len(labels) == len(indices) or not len(points):
        raise InputError(f"{len(points)} points, {len(labels)} labels and {len(indices)} "
                         "indices: need as many of each, at least one")
    if tuple(points.shape[1:]) != tuple(model.input_shape):
        raise InputError(f"points of shape {tuple(points.shape[1:])}; the model takes "
                         f"{tuple(model.input_shape)}")
    out = check_export_dir(out_dir)
    network = onnx_bytes(model) if onnx is None else None
    onnx_rel = MODEL_NAME if onnx is None else os.path.relpath(Path(onnx).resolve(),
                                                               out.resolve())
    files = {}
    for x, label, index in zip(points, labels, indices, strict=True):
        prop = linf_robustness(x, eps, label, model.num_classes, lo, hi)
        files[property_name(index, eps)] = format_vnnlib(
            prop, f"certnet export: l_inf robustness of point {index}, label {label} (its "
            f"true label), eps {eps!r}, inputs clipped to [{lo:g}, {hi:g}]")
    if len(files) != len(indices):
        raise InputError("two points have the same index")
    csv = "".join(f"{onnx_rel},{name},{timeout_s:g}\n" for name in files)

    def write(folder: Path) -> None:
        if network is not None:
            atomic_write(folder / MODEL_NAME, network)
        for name, text in files.items():
            atomic_write(folder / name, text)
        atomic_write(folder / "instances.csv", csv)

    _write_directory(out, write, mode=0o777 & ~UMASK)
    return out


__all__ = ["CONVERTERS", "check_export_dir", "export_onnx", "export_vnnlib", "onnx_bytes",
           "property_name", "to_onnx"]
