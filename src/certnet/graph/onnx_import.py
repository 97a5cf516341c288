"""ONNX files as :class:`certnet.graph.Graph`: every node becomes a certnet operator module
(``Gemm`` a ``nn.Linear``, ``Sub``/``Div`` by constants a :class:`Normalize`, ``MaxPool`` a
``nn.MaxPool2d``, ``LeakyRelu`` a ``nn.LeakyReLU``, ``Mul``/``Div``/``Add``/``Sub`` with any
other constant a :class:`certnet.nn.scale.Scale`, ``Pad`` in constant mode a
:class:`certnet.nn.pad.Pad`, ...) whose bound, rounding and spec rules
are registered with its layer type. Parsed with the ``onnx`` package
(protobuf: loading executes nothing); external tensor data, unknown operators and attributes
certnet does not model are refused naming the node. The converters are one table,
:data:`ONNX_OPS` (operator type -> converter); before them, :func:`_fuse` replaces the node
groups certnet's own export writes for MinMax, ClippedMinMax, ClippedReLU and l_p-dist layers
by those layers, so certnet's exports read back as the networks they came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.graph.graph import INPUT, Graph, Node
from certnet.graph.hints import hint
from certnet.graph.ops import Add, Concat
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate, patch_kernel
from certnet.nn.lipschitz import Normalize, check_batchnorm
from certnet.nn.pad import Pad, check_padding
from certnet.nn.reshape import Reshape
from certnet.nn.scale import Scale
from certnet.nn.smooth import Erf
from certnet.registry import Registry

#: the largest ONNX file read (bytes): the shared VNN-COMP networks are a few MB
MAX_BYTES = 1 << 30


@dataclass
class Value:
    """An ONNX value while building: a constant tensor, or the output of node ``node`` (or
    of the input, :data:`INPUT`) with one example of it (batch of one) for its shape."""

    const: torch.Tensor | None = None
    node: int = INPUT
    example: torch.Tensor | None = None


@dataclass
class Build:
    """The graph under construction: its nodes, an example output of each (and of the
    input), and how many times each ONNX value is read."""

    nodes: list[Node]
    examples: dict[int, torch.Tensor]
    uses: dict[str, int]

    def replace_last(self, op: nn.Module) -> Value:
        """Put ``op`` in place of the last node (same input): its new Value."""
        last = self.nodes[-1]
        self.nodes[-1] = Node(op, last.inputs, last.name)
        with torch.no_grad():
            self.examples[len(self.nodes) - 1] = op(self.examples[last.inputs[0]])
        return Value(node=len(self.nodes) - 1, example=self.examples[len(self.nodes) - 1])


Converter = Callable[[Any, list[Value], dict[str, Any], Build], "Value | nn.Module | None"]
#: ONNX operator type -> converter(onnx node, its input values, attributes, build): a constant
#: Value (folded), an operator module applied to the node's one dynamic input, or None (the
#: identity)
ONNX_OPS: Registry[Converter] = Registry("ONNX operator")


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise UnsupportedLayerError("reading ONNX needs the onnx package: pip install "
                                    "'certnet[onnx]'") from err
    return onnx


def load_onnx(path: str | Path) -> Graph:
    """The network of an ONNX file as a :class:`Graph` of certnet operators (float64 weights
    as stored, converted exactly). One input and one output; the first input dimension is the
    batch (1 or symbolic)."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ONNX file")
    if path.stat().st_size > MAX_BYTES:
        raise InputError(f"{path}: larger than {MAX_BYTES >> 20} MiB")
    try:
        model = onnx.load_model_from_string(path.read_bytes())
        onnx.checker.check_model(model)
    except Exception as err:  # protobuf's DecodeError, onnx's ValidationError, ...
        raise InputError(f"{path} is not a valid ONNX model: {str(err).splitlines()[0]}") \
            from None
    graph = model.graph
    numpy_helper = onnx.numpy_helper
    consts: dict[str, Value] = {}
    for init in graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise InputError(f"{path}: tensor {init.name} is stored in an external file; "
                             "certnet reads self-contained ONNX files only")
        consts[init.name] = Value(const=torch.from_numpy(numpy_helper.to_array(init).copy()))
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedLayerError(f"{path}: {len(inputs)} inputs and {len(graph.output)} "
                                    "outputs; certnet reads networks with one of each")
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or dims[0] not in (1, None) or any(d in (None, 0) for d in dims[1:]):
        raise UnsupportedLayerError(f"{path}: input shape {dims}; certnet needs a batch "
                                    "dimension (1 or symbolic) followed by fixed sizes")
    shape = tuple(dims[1:])
    example = torch.rand(1, *shape, dtype=torch.float64)
    values = {**consts, inputs[0].name: Value(node=INPUT, example=example)}
    nodes = _fuse(list(graph.node), consts, graph.output[0].name)
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    build = Build([], {INPUT: example}, uses)
    for node in nodes:
        where = f"ONNX node {node.name or node.output[0]!r} ({node.op_type})"
        if isinstance(node, Fused):
            convert = node.convert
        elif node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS:
            raise UnsupportedLayerError(
                f"{where}: operator {'of domain ' + node.domain + ' ' if node.domain else ''}"
                f"not supported{hint(node.op_type)}; supported: {', '.join(ONNX_OPS.names())}")
        else:
            convert = ONNX_OPS[node.op_type]
        if len(node.output) != 1:
            raise UnsupportedLayerError(f"{where}: {len(node.output)} outputs")
        missing = [n for n in node.input if n and n not in values]
        if missing:
            raise UnsupportedLayerError(f"{where}: inputs {missing} are not computed before")
        args = [values[n] if n else Value() for n in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            out = convert(node, args, attrs, build)
        except (UnsupportedLayerError, InputError) as err:
            raise type(err)(f"{where}: {err}") from None
        values[node.output[0]] = _apply(out, args, build, where)
    result = values[graph.output[0].name]
    if result.const is not None or not build.nodes:
        raise UnsupportedLayerError(f"{path}: the output does not depend on the input")
    if result.node != len(build.nodes) - 1:
        raise UnsupportedLayerError(f"{path}: the output is not the last operator's")
    return Graph(build.nodes, shape).double()


@dataclass
class Fused:
    """A group of ONNX nodes that certnet's export (:mod:`certnet.export`) writes for one of
    its layers, read back as that layer by ``convert`` (a :data:`Converter`) from the group's
    outer ``input`` s: the value, then constants."""

    op_type: str
    input: list[str]
    output: list[str]
    name: str
    convert: Converter
    attribute: tuple = ()


def _fuse(nodes: list[Any], consts: dict[str, Value], output: str) -> list[Any]:
    """``nodes`` with each of export's node groups for MinMax (Split, Min, Max, Concat),
    ClippedMinMax (Split, Min, Max, Max/Min with thresholds, Concat), ClippedReLU (Min with
    thresholds, Clip at 0) and l_p-dist at p = inf, 1, 2 (Unsqueeze, Sub, Abs, ReduceMax /
    ReduceL1 / ReduceL2, optional Add of the bias), torch's exact GELU (Div by sqrt 2, Erf,
    Add 1, Mul by the input, Mul by 0.5; the constant sqrt 2 to float32 precision, so the
    group is GELU up to that rounding of its argument) and SiLU (Sigmoid, Mul by its input)
    replaced by one :class:`Fused` node at the group's last position. A group is taken only
    where its inner values are read by the group alone, so the rest of the graph computes
    what it did."""
    users: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            users.setdefault(name, []).append(i)
    taken: set[int] = set()

    def only(name: str, op: str | tuple[str, ...]) -> int | None:
        """The one node reading ``name`` (once), if of type ``op`` and free; else None."""
        readers = users.get(name, [])
        ops = (op,) if isinstance(op, str) else op
        if name == output or len(readers) != 1 or readers[0] in taken or \
                nodes[readers[0]].op_type not in ops or nodes[readers[0]].domain not in \
                ("", "ai.onnx"):
            return None
        return readers[0]

    def attr(node: Any, key: str, default: Any = None) -> Any:
        return next((_onnx().helper.get_attribute_value(a) for a in node.attribute
                     if a.name == key), default)

    constant_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.output}

    def const_of(node: Any, value: str) -> str | None:
        """The other input of a two-input node, if it is an initializer."""
        other = [n for n in node.input if n != value]
        return other[0] if len(node.input) == 2 and len(other) == 1 and other[0] in consts \
            else None

    def other_scalar(node: Any, value: str) -> float | None:
        """The other input of a two-input node, if a one-element initializer or Constant."""
        other = [n for n in node.input if n != value]
        return scalar(other[0]) if len(node.input) == 2 and len(other) == 1 else None

    def scalar(name: str) -> float | None:
        """The value of a one-element constant (initializer or Constant node), else None."""
        if name in consts:
            tensor = consts[name].const
        elif name in constant_nodes and attr(constant_nodes[name], "value") is not None:
            tensor = torch.from_numpy(_onnx().numpy_helper.to_array(
                attr(constant_nodes[name], "value")).copy())
        else:
            return None
        return float(tensor.reshape(-1)[0]) if tensor.numel() == 1 else None

    def ints(node: Any, key: str, index: int) -> list[int] | None:
        """An integer list given as attribute ``key`` or as constant input ``index``."""
        if attr(node, key) is not None:
            return [int(v) for v in attr(node, key)]
        if len(node.input) > index and node.input[index] in consts:
            return [int(v) for v in consts[node.input[index]].const.flatten().tolist()]
        return None

    fused: dict[int, Fused] = {}

    def take(group: list[int], op_type: str, inputs: list[str], convert: Converter) -> None:
        last = max(group)
        taken.update(group)
        fused[last] = Fused(op_type, inputs, list(nodes[last].output),
                            nodes[last].name or nodes[last].output[0], convert)

    for i, node in enumerate(nodes):  # MinMax and ClippedMinMax: from their Split
        if node.op_type != "Split" or len(node.output) != 2 or attr(node, "axis", 0) != 1 or \
                node.domain not in ("", "ai.onnx"):
            continue
        sizes = ints(node, "split", 1)
        if sizes is not None and (len(sizes) != 2 or sizes[0] != sizes[1]):
            continue
        low, high = node.output
        readers = sorted(users.get(low, []))
        if readers != sorted(users.get(high, [])) or len(readers) != 2 or \
                {nodes[j].op_type for j in readers} != {"Min", "Max"} or \
                any(sorted(nodes[j].input) != sorted([low, high]) or j in taken
                    for j in readers) or output in (low, high):
            continue
        mn, mx = sorted(readers, key=lambda j: nodes[j].op_type != "Min")
        cat = only(nodes[mn].output[0], "Concat")
        if cat is not None and list(nodes[cat].input) == [nodes[mn].output[0],
                                                          nodes[mx].output[0]] and \
                attr(nodes[cat], "axis") == 1 and cat == only(nodes[mx].output[0], "Concat"):
            take([i, mn, mx, cat], "Split/Min/Max/Concat: MinMax", [node.input[0]], _minmax)
            continue
        clip_low, clip_high = only(nodes[mn].output[0], "Max"), only(nodes[mx].output[0], "Min")
        if clip_low is None or clip_high is None:
            continue
        lower = const_of(nodes[clip_low], nodes[mn].output[0])
        upper = const_of(nodes[clip_high], nodes[mx].output[0])
        cat = only(nodes[clip_low].output[0], "Concat")
        if lower and upper and cat is not None and \
                cat == only(nodes[clip_high].output[0], "Concat") and \
                list(nodes[cat].input) == [nodes[clip_low].output[0],
                                           nodes[clip_high].output[0]] and \
                attr(nodes[cat], "axis") == 1:
            take([i, mn, mx, clip_low, clip_high, cat],
                 "Split/Min/Max/Max/Min/Concat: ClippedMinMax", [node.input[0], lower, upper],
                 _clipped_minmax)
    for i, node in enumerate(nodes):  # ClippedReLU: Min with thresholds, then Clip at 0
        threshold = const_of(node, node.input[0]) if len(node.input) == 2 else None
        if node.op_type != "Min" or i in taken or threshold is None or \
                node.domain not in ("", "ai.onnx"):
            continue
        clip = only(node.output[0], "Clip")
        if clip is not None and len(nodes[clip].input) == 2 and \
                nodes[clip].input[0] == node.output[0] and nodes[clip].input[1] in consts and \
                not bool(consts[nodes[clip].input[1]].const.any()) and not nodes[clip].attribute:
            take([i, clip], "Min/Clip: ClippedReLU", [node.input[0], threshold], _clipped_relu)
    for i, node in enumerate(nodes):  # l_p-dist: from the Unsqueeze
        if node.op_type != "Unsqueeze" or i in taken or ints(node, "axes", 1) != [1] or \
                node.domain not in ("", "ai.onnx"):
            continue
        sub = only(node.output[0], "Sub")
        if sub is None or nodes[sub].input[0] != node.output[0] or \
                const_of(nodes[sub], node.output[0]) is None:
            continue
        absolute = only(nodes[sub].output[0], "Abs")
        reduce = None if absolute is None else \
            only(nodes[absolute].output[0], ("ReduceMax", "ReduceL1", "ReduceL2"))
        if reduce is None or ints(nodes[reduce], "axes", 1) != [2] or \
                attr(nodes[reduce], "keepdims", 1) != 0:
            continue
        group, inputs = [i, sub, absolute, reduce], [node.input[0], nodes[sub].input[1]]
        add = only(nodes[reduce].output[0], "Add")
        bias = None if add is None else const_of(nodes[add], nodes[reduce].output[0])
        if bias is not None:
            group, inputs = [*group, add], [*inputs, bias]
        p = {"ReduceMax": math.inf, "ReduceL1": 1.0, "ReduceL2": 2.0}[nodes[reduce].op_type]
        conv = next((j for j, n in enumerate(nodes) if node.input[0] in n.output), None)
        patches = None if conv is None or only(node.input[0], "Unsqueeze") != i else \
            _patch_conv(nodes[conv], consts)
        if patches is not None:  # the convolutional layer: its one-hot patch conv first
            take([conv, *group], f"Conv/Unsqueeze/Sub/Abs/{nodes[reduce].op_type}: "
                 "LinfDistConv2d", [nodes[conv].input[0], *inputs[1:]],
                 lambda n, a, at, b, p=p, g=patches: _linf_dist_conv(a, p, *g))
            continue
        take(group, f"Unsqueeze/Sub/Abs/{nodes[reduce].op_type}: LinfDist",
             inputs, lambda n, a, at, b, p=p: _linf_dist(a, p))
    for i, node in enumerate(nodes):  # GELU: Div by sqrt 2, Erf, Add 1, Mul by x, Mul by 0.5
        if node.op_type != "Erf" or i in taken or node.domain not in ("", "ai.onnx"):
            continue
        div = next((j for j, n in enumerate(nodes) if node.input[0] in n.output), None)
        if div is None or nodes[div].op_type != "Div" or only(nodes[div].output[0], "Erf") != i \
                or not _near(other_scalar(nodes[div], nodes[div].input[0]), math.sqrt(2)):
            continue
        x = nodes[div].input[0]
        add = only(node.output[0], "Add")
        times = None if add is None else only(nodes[add].output[0], "Mul")
        half = None if times is None else only(nodes[times].output[0], "Mul")
        if half is None or other_scalar(nodes[add], node.output[0]) != 1.0 or \
                sorted(nodes[times].input) != sorted([x, nodes[add].output[0]]) or \
                other_scalar(nodes[half], nodes[times].output[0]) != 0.5:
            continue
        take([div, i, add, times, half], "Div/Erf/Add/Mul/Mul: GELU", [x],
             lambda n, a, at, b: nn.GELU())
    for i, node in enumerate(nodes):  # SiLU: Sigmoid, then Mul by its own input
        if node.op_type != "Sigmoid" or i in taken or node.domain not in ("", "ai.onnx"):
            continue
        times = only(node.output[0], "Mul")
        if times is not None and sorted(nodes[times].input) == sorted([node.input[0],
                                                                       node.output[0]]):
            take([i, times], "Sigmoid/Mul: SiLU", [node.input[0]], lambda n, a, at, b: nn.SiLU())
    return [fused.get(i, node) for i, node in enumerate(nodes)
            if i in fused or i not in taken]


def _near(value: float | None, target: float) -> bool:
    """Whether a constant is ``target`` to float32 precision (an exported sqrt 2)."""
    return value is not None and abs(value - target) <= 2 ** -23 * target


def _thresholds(value: Value, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A constant broadcast to one point's ``shape`` (never over the batch)."""
    c = _const(value, what).double()
    try:
        if torch.broadcast_shapes(c.shape, (1, *shape)) != (1, *shape):
            raise RuntimeError
    except RuntimeError:
        raise UnsupportedLayerError(f"{what} of shape {tuple(c.shape)} for values of shape "
                                    f"{shape}") from None
    return torch.broadcast_to(c, (1, *shape))[0]


def _minmax(node, args, attrs, build):
    return MinMax()


def _clipped_minmax(node, args, attrs, build):
    shape = tuple(args[0].example.shape[1:])
    half = (shape[0] // 2, *shape[1:])
    layer = ClippedMinMax(list(shape)).double()
    with torch.no_grad():
        layer.lower.copy_(_thresholds(args[1], half, "the lower thresholds"))
        layer.upper.copy_(_thresholds(args[2], half, "the upper thresholds"))
    return layer


def _clipped_relu(node, args, attrs, build):
    shape = tuple(args[0].example.shape[1:])
    layer = ClippedReLU(list(shape)).double()
    with torch.no_grad():
        layer.threshold.copy_(_thresholds(args[1], shape, "the thresholds"))
    return layer


def _linf_dist(args: list[Value], p: float) -> LinfDist:
    weight = _const(args[1], "the weights").double()
    example = args[0].example
    if example is None or example.dim() != 2 or weight.dim() != 2 or \
            weight.shape[1] != example.shape[1]:
        raise UnsupportedLayerError(f"weights of shape {tuple(weight.shape)} for inputs "
                                    f"{tuple(example.shape) if example is not None else None}"
                                    "; l_p-dist layers on (batch, features) only")
    layer = LinfDist(weight.shape[1], weight.shape[0], p, bias=len(args) > 2).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(_thresholds(args[2], (weight.shape[0],), "the bias"))
    return layer


def _patch_conv(node: Any, consts: dict[str, Value]) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) if ``node`` is the patch extraction certnet's export writes
    for an l_p-dist convolution: a Conv without bias whose kernel is the one-hot tensor taking
    input (c, i, j) to channel c k k + i k + j (unfold's order), square, equal strides and
    pads, no dilation or groups; else None."""
    if node.op_type != "Conv" or len(node.input) != 2 or node.input[1] not in consts:
        return None
    kernel = consts[node.input[1]].const
    attrs = {a.name: _onnx().helper.get_attribute_value(a) for a in node.attribute}
    if kernel.dim() != 4 or kernel.shape[2] != kernel.shape[3]:
        return None
    c, k = kernel.shape[1], kernel.shape[2]
    strides, pads = list(attrs.get("strides", [1, 1])), list(attrs.get("pads", [0] * 4))
    if kernel.shape[0] != c * k * k or not torch.equal(kernel, patch_kernel(c, k, kernel.dtype)) \
            or len(set(strides)) != 1 or len(set(pads)) != 1 or \
            set(attrs) - {"kernel_shape", "strides", "pads", "dilations", "group"} or \
            any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("group", 1) != 1:
        return None
    return k, strides[0], pads[0]


def _linf_dist_conv(args: list[Value], p: float, kernel: int, stride: int, padding: int
                    ) -> LinfDistConv2d:
    """The convolutional l_p-dist layer of certnet's export (patches, then distances)."""
    weight = _const(args[1], "the weights").double()
    example = args[0].example
    if example is None or example.dim() != 4 or weight.dim() != 4 or \
            weight.shape[1] != example.shape[1] * kernel * kernel or weight.shape[2:] != (1, 1):
        raise UnsupportedLayerError(f"weights of shape {tuple(weight.shape)} for patches of "
                                    f"{tuple(example.shape) if example is not None else None}")
    layer = LinfDistConv2d(example.shape[1], weight.shape[0], kernel, stride, padding, p,
                           bias=len(args) > 2).double()
    with torch.no_grad():
        layer.weight.copy_(weight.flatten(1))
        if layer.bias is not None:
            bias = _const(args[2], "the bias").double()
            if bias.numel() != weight.shape[0]:
                raise UnsupportedLayerError(f"a bias of shape {tuple(bias.shape)} for "
                                            f"{weight.shape[0]} filters")
            layer.bias.copy_(bias.flatten())
    return layer


def _apply(out: Value | nn.Module | None, args: list[Value], build: Build, where: str
           ) -> Value:
    """The Value of a node from its converter's result: a folded constant as is; an operator
    applied to the node's single dynamic input, appended as a new graph node."""
    if isinstance(out, Value):
        return out
    dynamic = [a for a in args if a.const is None and a.example is not None]
    if isinstance(out, (Add, Concat)):  # joins: every input computed
        if len(dynamic) != len(args):
            raise UnsupportedLayerError(f"{where}: joins computed values only")
        with torch.no_grad():
            example = out(*[a.example for a in dynamic])
        build.nodes.append(Node(out, tuple(a.node for a in dynamic), where))
        build.examples[len(build.nodes) - 1] = example
        return Value(node=len(build.nodes) - 1, example=example)
    if len(dynamic) != 1:
        raise UnsupportedLayerError(f"{where}: {len(dynamic)} non-constant inputs (certnet "
                                    "reads operators of one input here)")
    if out is None:
        return dynamic[0]
    out = out.double().eval()
    with torch.no_grad():
        example = out(dynamic[0].example)
    build.nodes.append(Node(out, (dynamic[0].node,), where))
    build.examples[len(build.nodes) - 1] = example
    return Value(node=len(build.nodes) - 1, example=example)


def _const(value: Value, what: str) -> torch.Tensor:
    if value.const is None:
        raise UnsupportedLayerError(f"{what} must be a constant")
    if not torch.isfinite(value.const.double()).all():
        raise InputError(f"{what} has NaN or infinite entries")
    return value.const


def _no_attributes(attrs: dict[str, Any], allowed: dict[str, Any]) -> None:
    """Refuse attributes whose value certnet does not model (the allowed values given)."""
    for key, value in attrs.items():
        if key not in allowed or value != allowed[key]:
            raise UnsupportedLayerError(f"attribute {key}={value!r} is not supported")


def _gemm(node, args, attrs, build):
    _no_attributes(attrs, {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": attrs.get(
        "transB", 0)})
    weight = _const(args[1], "the weight (B)").double()
    weight = weight if attrs.get("transB", 0) else weight.T
    return _linear(weight, args[2].const if len(args) > 2 and args[2].const is not None
                   else None)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    if weight.dim() != 2:
        raise UnsupportedLayerError(f"a weight of shape {tuple(weight.shape)}")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            if bias.numel() != weight.shape[0]:
                raise UnsupportedLayerError(f"a bias of {bias.numel()} entries for "
                                            f"{weight.shape[0]} outputs")
            layer.bias.copy_(bias.double().flatten())
    return layer


def _matmul(node, args, attrs, build):
    return _linear(_const(args[1], "the right factor").double().T, None)


def _folded(args: list[Value], op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
            ) -> Value | None:
    """The constant ``op(a, b)`` of two constant inputs (folded as onnxruntime computes it, in
    their stored dtype), else None."""
    if len(args) == 2 and all(a.const is not None for a in args):
        return Value(const=op(args[0].const, args[1].const))
    return None


def _elementwise(dynamic: Value, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, divide: bool = False) -> Scale:
    """A :class:`Scale` on the computed value ``dynamic``: its constants must broadcast over
    each point without changing its shape (never over the batch)."""
    layer = Scale(weight, bias, divide)
    if dynamic.example is not None:
        try:
            layer.operands(dynamic.example)
        except InputError as err:
            raise UnsupportedLayerError(str(err)) from None
    return layer


def _linear_shift(op: nn.Linear, c: torch.Tensor) -> nn.Module | None:
    """A bias-free MatMul's Linear with ``c`` as its bias (one entry per output)."""
    return _linear(op.weight.detach(), c) if op.bias is None and \
        c.numel() == op.out_features else None


def _scale_shift(op: Scale, c: torch.Tensor) -> Scale | None:
    """x * w (x / w) then + c: one Scale, computing the same two float operations."""
    return Scale(op.weight, c, op.divide) if op.bias is None else None


def _normalize_shift(op: Normalize, c: torch.Tensor) -> Scale | None:
    """A lone Div (a Normalize of mean 0: (x - 0) / s is x / s exactly) then + c: one Scale."""
    return Scale(op.std, c, divide=True) if not bool(op.mean.any()) else None


#: exact operator class -> how it takes a ``+ c`` that follows it (computing the same float
#: operations), or None where it cannot
_SHIFTS: dict[type[nn.Module], Callable[[Any, torch.Tensor], nn.Module | None]] = {
    nn.Linear: _linear_shift, Scale: _scale_shift, Normalize: _normalize_shift}


def _add(node, args, attrs, build):
    """x + y of two computed values: a residual :class:`Add`. x + c (or c + x) right after an
    operator read only here that takes it exactly (:data:`_SHIFTS`: a bias-free MatMul's bias,
    a Scale's or a lone Div's shift): that operator with c; else a Scale adding c."""
    if all(a.const is None for a in args):
        return Add()  # a residual connection: a node of two inputs
    folded = _folded(args, torch.add)
    if folded is not None:
        return folded
    first = args[1].const is not None
    const, dynamic = (args[1], args[0]) if first else (args[0], args[1])
    c = _const(const, "the added term")
    last = build.nodes[-1].op if build.nodes and dynamic.node == len(build.nodes) - 1 else None
    shift = _SHIFTS.get(type(last))
    if shift is not None and build.uses.get(node.input[0 if first else 1], 0) == 1:
        fused = shift(last, c)
        if fused is not None:
            _elementwise(dynamic, bias=c)  # c broadcasts over each point, elementwise
            return build.replace_last(fused)
    return _elementwise(dynamic, bias=c)


def _mul(node, args, attrs, build):
    """x * c or c * x, c any constant broadcasting over each point: a Scale."""
    folded = _folded(args, torch.mul)
    if folded is not None:
        return folded
    if all(a.const is None for a in args):
        raise UnsupportedLayerError("a product of two computed values; certnet multiplies by "
                                    "constants only")
    const, dynamic = (args[1], args[0]) if args[1].const is not None else (args[0], args[1])
    return _elementwise(dynamic, weight=_const(const, "the factor"))


def _normalize(mean: torch.Tensor, std: torch.Tensor) -> Normalize:
    if mean.numel() != std.numel():
        mean = mean.expand(std.shape) if mean.numel() == 1 else mean
        std = std.expand(mean.shape) if std.numel() == 1 else std
    return Normalize(mean.double().flatten().tolist(), std.double().flatten().tolist())


def _per_channel(value: Value, dynamic: Value, what: str) -> torch.Tensor:
    """A constant that broadcasts as one value, or one per channel, over a (1, C, H, W)
    input."""
    c = _const(value, what)
    if dynamic.example is None or dynamic.example.dim() != 4:
        raise UnsupportedLayerError(f"{what}: on a (batch, channels, height, width) input only")
    channels = dynamic.example.shape[1]
    if c.numel() == 1 or (c.numel() == channels and
                          c.squeeze().shape == (channels,) and c.dim() <= 4 and
                          (c.dim() < 3 or c.shape[-1] == c.shape[-2] == 1)):
        return c.flatten()
    raise UnsupportedLayerError(f"{what} of shape {tuple(c.shape)} is not per channel")


def _sub(node, args, attrs, build):
    """x - c: per feature of (batch, features) a MeanShift, per channel of images a Normalize
    (folded with a Div after it), any other constant a Scale adding -c (the same float
    difference); c - x: a Scale x * -1 + c (exactly the float c - x)."""
    folded = _folded(args, torch.sub)
    if folded is not None:
        return folded
    if args[0].const is not None:
        c = _const(args[0], "the minuend")
        return _elementwise(args[1], weight=-torch.ones((), dtype=c.dtype), bias=c)
    if args[1].const is None:
        raise UnsupportedLayerError("a difference of two computed values; certnet subtracts "
                                    "constants only")
    example = args[0].example
    try:
        if example is not None and example.dim() == 2:  # (batch, features) - per feature
            shift = MeanShift(example.shape[1]).double().eval()
            with torch.no_grad():
                shift.running_mean.copy_(_thresholds(args[1], tuple(example.shape[1:]),
                                                     "the subtracted term"))
            return shift
        return _normalize(_per_channel(args[1], args[0], "the subtracted term"),
                          torch.ones(1, dtype=torch.float64))
    except UnsupportedLayerError:
        return _elementwise(args[0], bias=-_const(args[1], "the subtracted term"))


def _div(node, args, attrs, build):
    """x / c: per channel of images a Normalize (folded into the Normalize of a Sub before
    it), any other constant a Scale dividing by c (never a product with 1 / c)."""
    folded = _folded(args, lambda a, b: torch.div(  # integers: truncated, as ONNX divides them
        a, b, rounding_mode=None if a.is_floating_point() else "trunc"))
    if folded is not None:
        return folded
    if args[1].const is None:
        raise UnsupportedLayerError("a division by a computed value (1 / x is not affine); "
                                    "certnet divides by constants only")
    try:
        std = _per_channel(args[1], args[0], "the divisor").double()
    except UnsupportedLayerError:
        return _elementwise(args[0], weight=_const(args[1], "the divisor"), divide=True)
    last = build.nodes[-1].op if build.nodes and args[0].node == len(build.nodes) - 1 else None
    if type(last) is Normalize and bool((last.std == 1).all()) and \
            build.uses.get(node.input[0], 0) == 1:  # (x - m) / 1 / s = (x - m) / s exactly
        return build.replace_last(_normalize(last.mean.flatten(), std).double())
    return _normalize(torch.zeros(1, dtype=torch.float64), std)


def _pad(node, args, attrs, build):
    """Pad in constant mode: the pads (an attribute before opset 11, else a constant input),
    the value (attribute ``value`` before opset 11, else an optional constant input; 0 by
    default) and the optional constant axes (opset 18) as a :class:`Pad`; the batch is never
    padded. Reflect, edge and wrap modes are refused."""
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise UnsupportedLayerError(f"Pad mode {mode!r}: certnet bounds constant padding only "
                                    "(reflect, edge and wrap padding are refused)")
    _no_attributes(attrs, {"mode": attrs.get("mode"), "pads": attrs.get("pads"),
                           "value": attrs.get("value")})
    example = args[0].example
    if example is None:
        raise UnsupportedLayerError("padding a constant")
    if "pads" in attrs:
        pads = [int(p) for p in attrs["pads"]]
    elif len(args) > 1:
        pads = [int(v) for v in _const(args[1], "the pads").flatten().tolist()]
    else:
        raise UnsupportedLayerError("Pad without pads")
    value = float(attrs.get("value", 0.0))
    if len(args) > 2 and node.input[2]:
        given = _const(args[2], "the padding value")
        if given.numel() != 1:
            raise UnsupportedLayerError("a padding value of more than one entry")
        value = float(given.reshape(()))
    rank = example.dim()
    axes = list(range(rank))
    if len(args) > 3 and node.input[3]:
        axes = [int(a) + rank if int(a) < 0 else int(a)
                for a in _const(args[3], "the axes").flatten().tolist()]
    if len(pads) != 2 * len(axes) or len(set(axes)) != len(axes) or \
            not all(0 <= a < rank for a in axes):
        raise UnsupportedLayerError(f"pads {pads} for axes {axes} of a rank-{rank} input")
    begins, ends = dict(zip(axes, pads[:len(axes)], strict=True)), \
        dict(zip(axes, pads[len(axes):], strict=True))
    if begins.get(0, 0) or ends.get(0, 0):
        raise UnsupportedLayerError(f"pads {pads} pad the batch axis")
    padding = [p for axis in range(rank - 1, 0, -1)
               for p in (begins.get(axis, 0), ends.get(axis, 0))]
    while len(padding) > 2 and not any(padding[-2:]):  # leading axes left alone: no pair
        padding = padding[:-2]
    check_padding(padding, example.shape)
    return Pad(padding, value)


def _flatten(node, args, attrs, build):
    _no_attributes(attrs, {"axis": 1})
    return nn.Flatten()


def _view(example: torch.Tensor | None, shape: list[int], what: str) -> nn.Module | None:
    """The reshape of (1, *s) values to (1, *shape): a Flatten to (batch, n) (as before
    Reshape existed, even from (batch, n)), None where nothing else changes, else a
    :class:`Reshape`."""
    if example is None or math.prod(shape) != example[0].numel() or min(shape, default=1) < 1:
        raise UnsupportedLayerError(f"{what}: {tuple(shape)} does not hold the values of one "
                                    "point")
    if len(shape) == 1:
        return nn.Flatten()
    return None if tuple(shape) == tuple(example.shape[1:]) else Reshape(shape)


def _reshape(node, args, attrs, build):
    """A reshape keeping the batch (first) dimension: 0 copies an input size, -1 is inferred;
    a batch entry of 1, 0 or -1 (the file's batch is 1 or symbolic)."""
    _no_attributes(attrs, {"allowzero": 0})
    target = [int(v) for v in _const(args[1], "the shape").flatten().tolist()]
    example = args[0].example
    if example is None or not target or target[0] not in (1, -1, 0):
        raise UnsupportedLayerError(f"reshape to {target}: the first dimension must stay the "
                                    "batch (1, 0 or -1)")
    rest = [example.shape[i] if v == 0 and i < example.dim() else v
            for i, v in enumerate(target)][1:]
    if rest.count(-1) + (target[0] == -1) > 1 or 0 in rest:
        raise UnsupportedLayerError(f"reshape to {target}: more than one -1, or a 0 past the "
                                    "input's dimensions")
    if -1 in rest:
        known = math.prod(v for v in rest if v != -1)
        if example[0].numel() % known:
            raise UnsupportedLayerError(f"reshape of {tuple(example.shape)} to {target}")
        rest[rest.index(-1)] = example[0].numel() // known
    return _view(example, rest, f"reshape to {target}")


def _axes(args: list[Value], attrs: dict[str, Any], rank: int | None, what: str) -> list[int]:
    """The ``axes`` (an attribute before opset 13, else a constant second input), made
    non-negative for ``rank`` dimensions (None: the input's rank plus their number, as
    Unsqueeze's output has); the batch (axis 0) is refused."""
    if "axes" in attrs:
        axes = [int(a) for a in attrs["axes"]]
    elif len(args) > 1 and args[1].const is not None:
        axes = [int(v) for v in _const(args[1], "the axes").flatten().tolist()]
    else:
        raise UnsupportedLayerError(f"{what} without constant axes (it would take the batch "
                                    "of 1 too)")
    _no_attributes({k: v for k, v in attrs.items() if k != "axes"}, {})
    rank = args[0].example.dim() + len(axes) if rank is None else rank
    found = sorted(a + rank if a < 0 else a for a in axes)
    if len(set(found)) != len(found) or not all(0 < a < rank for a in found):
        raise UnsupportedLayerError(f"{what} axes {axes}: each once, never the batch (axis 0)")
    return found


def _squeeze(node, args, attrs, build):
    example = args[0].example
    axes = _axes(args, attrs, example.dim(), "Squeeze")
    if any(example.shape[a] != 1 for a in axes):
        raise UnsupportedLayerError(f"squeezing axes {axes} of {tuple(example.shape)}: not of "
                                    "size 1")
    return _view(example, [d for i, d in enumerate(example.shape) if i not in axes][1:],
                 "Squeeze")


def _unsqueeze(node, args, attrs, build):
    example = args[0].example
    shape = list(example.shape)
    for a in _axes(args, attrs, None, "Unsqueeze"):  # ascending: positions in the output
        shape.insert(a, 1)
    return _view(example, shape[1:], "Unsqueeze")


def _transpose(node, args, attrs, build):
    """A permutation that moves only axes of size 1 (the order of the elements stays): a
    reshape."""
    example = args[0].example
    perm = [int(p) for p in attrs.get("perm", reversed(range(example.dim())))]
    _no_attributes(attrs, {"perm": attrs.get("perm")})
    big = [p for p in perm if p < example.dim() and example.shape[p] != 1]
    if sorted(perm) != list(range(example.dim())) or perm[0] != 0 or big != sorted(big):
        raise UnsupportedLayerError(f"transpose {perm} of {tuple(example.shape)} moves data "
                                    "(only permutations of size-1 axes after the batch)")
    return _view(example, [example.shape[p] for p in perm][1:], "Transpose")


def _batchnorm(node, args, attrs, build):
    """Inference BatchNormalization: an eval-mode BatchNorm1d/2d with the file's scale, bias,
    mean, variance and epsilon (momentum only matters in training)."""
    _no_attributes(attrs, {"epsilon": attrs.get("epsilon"), "momentum": attrs.get("momentum"),
                           "training_mode": 0, "spatial": 1})
    example = args[0].example
    if example is None or example.dim() not in (2, 4) or len(args) != 5:
        raise UnsupportedLayerError("BatchNormalization of 5 inputs on (batch, C) or (batch, "
                                    "C, H, W) only")
    scale, bias, mean, var = (_const(a, w).double().flatten() for a, w in zip(
        args[1:5], ("the scale", "the bias", "the mean", "the variance"), strict=True))
    channels = example.shape[1]
    if not all(t.numel() == channels for t in (scale, bias, mean, var)):
        raise UnsupportedLayerError(f"statistics not of {channels} channels")
    bn = (nn.BatchNorm2d if example.dim() == 4 else nn.BatchNorm1d)(
        channels, eps=float(attrs.get("epsilon", 1e-5)), dtype=torch.float64).eval()
    with torch.no_grad():
        for t, value in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean),
                         (bn.running_var, var)):
            t.copy_(value)
    check_batchnorm(bn, "BatchNormalization")
    return bn


def _avgpool(node, args, attrs, build):
    """2-D AveragePool, symmetric explicit padding counted as zeros (count_include_pad=1;
    without padding it makes no difference), ceil_mode=0: an AvgPool2d."""
    kernel = [int(k) for k in attrs.get("kernel_shape", [])]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    _no_attributes(attrs, {"kernel_shape": attrs.get("kernel_shape"), "pads": attrs.get("pads"),
                           "strides": attrs.get("strides"), "auto_pad": b"NOTSET",
                           "ceil_mode": 0, "count_include_pad": attrs.get(
                               "count_include_pad") if any(pads) else 1, "dilations": [1, 1]})
    if len(kernel) != 2 or len(pads) != 4 or pads[:2] != pads[2:]:
        raise UnsupportedLayerError(f"kernel {kernel}, pads {pads}: 2-D pooling with "
                                    "symmetric padding only")
    if any(pads) and not attrs.get("count_include_pad", 0):
        raise UnsupportedLayerError("padding not counted (count_include_pad=0): certnet bounds "
                                    "averages over the padded window only")
    if any(2 * p > k for p, k in zip(pads[:2], kernel, strict=True)):
        raise UnsupportedLayerError(f"padding {pads} over half the kernel {kernel}")
    return nn.AvgPool2d(tuple(kernel), tuple(strides), tuple(pads[:2]))


def _global_avgpool(node, args, attrs, build):
    """GlobalAveragePool: an AvgPool2d over the whole map, (batch, C, 1, 1) as ONNX has it."""
    example = args[0].example
    if example is None or example.dim() != 4:
        raise UnsupportedLayerError("GlobalAveragePool on (batch, C, H, W) only")
    return nn.AvgPool2d(tuple(example.shape[2:]))


def _maxpool(node, args, attrs, build):
    """2-D MaxPool, symmetric explicit padding (ONNX and torch alike take the max over the
    window's inputs inside the map), any strides and dilations, ceil_mode=0, one output: a
    MaxPool2d."""
    kernel = [int(k) for k in attrs.get("kernel_shape", [])]
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    _no_attributes(attrs, {"kernel_shape": attrs.get("kernel_shape"), "pads": attrs.get("pads"),
                           "strides": attrs.get("strides"), "dilations": attrs.get("dilations"),
                           "auto_pad": b"NOTSET", "ceil_mode": 0, "storage_order": 0})
    example = args[0].example
    if example is None or example.dim() != 4 or len(kernel) != 2 or len(pads) != 4 or \
            pads[:2] != pads[2:] or len(strides) != 2 or len(dilations) != 2:
        raise UnsupportedLayerError(f"kernel {kernel}, pads {pads}: 2-D pooling of (batch, C, "
                                    "H, W) with symmetric padding only")
    if any(2 * p > d * (k - 1) + 1 for p, k, d in zip(pads[:2], kernel, dilations,
                                                       strict=True)):
        raise UnsupportedLayerError(f"padding {pads} over half the kernel {kernel}")
    return nn.MaxPool2d(tuple(kernel), tuple(strides), tuple(pads[:2]), tuple(dilations))


def _leaky_relu(node, args, attrs, build):
    """LeakyRelu: a LeakyReLU with slope alpha (a float32 attribute, default float32 0.01, read
    exactly); certnet bounds 0 <= alpha <= 1."""
    _no_attributes(attrs, {"alpha": attrs.get("alpha")})
    alpha = float(attrs.get("alpha", float(torch.tensor(0.01, dtype=torch.float32))))
    if not 0 <= alpha <= 1:
        raise UnsupportedLayerError(f"LeakyRelu alpha={alpha!r}: certnet bounds slopes in "
                                    "[0, 1] only")
    return nn.LeakyReLU(alpha)


ONNX_OPS.register("Mul", _mul)
ONNX_OPS.register("Pad", _pad)
ONNX_OPS.register("MaxPool", _maxpool)
ONNX_OPS.register("LeakyRelu", _leaky_relu)


def _conv(node, args, attrs, build):
    weight = _const(args[1], "the kernel").double()
    if weight.dim() != 4:
        raise UnsupportedLayerError("2-D convolutions only")
    pads = attrs.get("pads", [0, 0, 0, 0])
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or \
            pads[:2] != pads[2:]:
        raise UnsupportedLayerError(f"padding {pads} (only symmetric explicit padding)")
    conv = nn.Conv2d(weight.shape[1] * attrs.get("group", 1), weight.shape[0],
                     tuple(weight.shape[2:]), stride=tuple(attrs.get("strides", [1, 1])),
                     padding=tuple(pads[:2]), dilation=tuple(attrs.get("dilations", [1, 1])),
                     groups=attrs.get("group", 1), bias=len(args) > 2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if len(args) > 2:
            conv.bias.copy_(_const(args[2], "the bias").double())
    return conv


def _clip(node, args, attrs, build):
    """Clip from 0 below: a ReLU; up to a number t >= 0 too (ONNX ends are scalars): a
    ClippedReLU (min(max(x, 0), t) = max(min(x, t), 0) for t >= 0)."""
    _no_attributes(attrs, {})
    low = args[1] if len(args) > 1 and node.input[1] else None
    high = args[2] if len(args) > 2 and node.input[2] else None
    if low is None or bool(_const(low, "the lower end").any()) or low.const.numel() != 1:
        raise UnsupportedLayerError("Clip with a lower end other than 0")
    if high is None:
        return nn.ReLU()
    shape = tuple(args[0].example.shape[1:]) if args[0].example is not None else ()
    threshold = _thresholds(high, shape, "the upper end")
    if _const(high, "the upper end").numel() != 1 or bool((threshold < 0).any()):
        raise UnsupportedLayerError("Clip with an upper end that is not one number >= 0")
    layer = ClippedReLU(list(shape)).double()
    with torch.no_grad():
        layer.threshold.copy_(threshold)
    return layer


def _concat(node, args, attrs, build):
    if attrs.get("axis") != 1:
        raise UnsupportedLayerError(f"concatenation along axis {attrs.get('axis')} (axis 1 "
                                    "only: channels or features)")
    return Concat(1)


def _identity(node, args, attrs, build):
    return None


def _constant(node, args, attrs, build):
    onnx = _onnx()
    if "value" not in attrs:
        raise UnsupportedLayerError("a Constant without a tensor value")
    return Value(const=torch.from_numpy(onnx.numpy_helper.to_array(attrs["value"]).copy()))


for _name, _convert in (("Gemm", _gemm), ("MatMul", _matmul), ("Add", _add), ("Sub", _sub),
                        ("Div", _div), ("Flatten", _flatten), ("Reshape", _reshape),
                        ("Conv", _conv), ("Relu", lambda *a: nn.ReLU()), ("Concat", _concat),
                        ("Identity", _identity), ("Dropout", _identity),
                        ("Constant", _constant), ("Squeeze", _squeeze),
                        ("Unsqueeze", _unsqueeze), ("Transpose", _transpose),
                        ("BatchNormalization", _batchnorm), ("AveragePool", _avgpool),
                        ("GlobalAveragePool", _global_avgpool),
                        ("Tanh", lambda *a: nn.Tanh()), ("Neg", lambda *a: Negate()),
                        ("Clip", _clip)):
    ONNX_OPS.register(_name, _convert)


def _gelu(node, args, attrs, build):
    approximate = attrs.get("approximate", b"none")
    if approximate not in ("none", b"none"):
        raise UnsupportedLayerError("Gelu with approximate='tanh' is not bounded; only the exact "
                                    "form x Phi(x)")
    return nn.GELU()


ONNX_OPS.register("Sigmoid", lambda *a: nn.Sigmoid())
ONNX_OPS.register("Erf", lambda *a: Erf())
ONNX_OPS.register("Gelu", _gelu)
