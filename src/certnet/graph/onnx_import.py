"""ONNX files as :class:`certnet.graph.Graph`: every node becomes a certnet operator module
(``Gemm`` a ``nn.Linear``, ``Sub``/``Div`` by constants a :class:`Normalize`, ...) whose bound,
rounding and spec rules are registered with its layer type. Parsed with the ``onnx`` package
(protobuf: loading executes nothing); external tensor data, unknown operators and attributes
certnet does not model are refused naming the node. The converters are one table,
:data:`ONNX_OPS` (operator type -> converter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.graph.graph import INPUT, Graph, Node
from certnet.graph.ops import Add, Concat
from certnet.nn.lipschitz import Normalize
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
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    build = Build([], {INPUT: example}, uses)
    for node in graph.node:
        where = f"ONNX node {node.name or node.output[0]!r} ({node.op_type})"
        if node.op_type not in ONNX_OPS:
            raise UnsupportedLayerError(
                f"{where}: operator not supported; supported: {', '.join(ONNX_OPS.names())}")
        if len(node.output) != 1:
            raise UnsupportedLayerError(f"{where}: {len(node.output)} outputs")
        missing = [n for n in node.input if n and n not in values]
        if missing:
            raise UnsupportedLayerError(f"{where}: inputs {missing} are not computed before")
        args = [values[n] if n else Value() for n in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            out = ONNX_OPS[node.op_type](node, args, attrs, build)
        except (UnsupportedLayerError, InputError) as err:
            raise type(err)(f"{where}: {err}") from None
        values[node.output[0]] = _apply(out, args, build, where)
    result = values[graph.output[0].name]
    if result.const is not None or not build.nodes:
        raise UnsupportedLayerError(f"{path}: the output does not depend on the input")
    if result.node != len(build.nodes) - 1:
        raise UnsupportedLayerError(f"{path}: the output is not the last operator's")
    return Graph(build.nodes, shape).double()


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


def _add(node, args, attrs, build):
    """x + c right after a bias-free MatMul read only here: the Linear's bias (exact)."""
    if all(a.const is None for a in args):
        return Add()  # a residual connection: a node of two inputs
    first = args[1].const is not None
    const, dynamic = (args[1], args[0]) if first else (args[0], args[1])
    last = build.nodes[-1].op if build.nodes and dynamic.node == len(build.nodes) - 1 else None
    if type(last) is nn.Linear and last.bias is None and \
            build.uses.get(node.input[0 if first else 1], 0) == 1:
        return build.replace_last(_linear(last.weight.detach(),
                                           _const(const, "the added term")))
    raise UnsupportedLayerError("adding a constant is supported after a MatMul only")


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
    if args[1].const is None:
        raise UnsupportedLayerError("subtracting a non-constant")
    return _normalize(_per_channel(args[1], args[0], "the subtracted term"),
                      torch.ones(1, dtype=torch.float64))


def _div(node, args, attrs, build):
    std = _per_channel(args[1], args[0], "the divisor").double()
    last = build.nodes[-1].op if build.nodes and args[0].node == len(build.nodes) - 1 else None
    if type(last) is Normalize and bool((last.std == 1).all()) and \
            build.uses.get(node.input[0], 0) == 1:  # (x - m) / 1 / s = (x - m) / s exactly
        return build.replace_last(_normalize(last.mean.flatten(), std).double())
    return _normalize(torch.zeros(1, dtype=torch.float64), std)


def _flatten(node, args, attrs, build):
    _no_attributes(attrs, {"axis": 1})
    return nn.Flatten()


def _reshape(node, args, attrs, build):
    """A reshape to (batch, everything else): a Flatten."""
    target = [int(v) for v in _const(args[1], "the shape").flatten().tolist()]
    example = args[0].example
    if example is None or len(target) != 2 or target[0] not in (1, -1, 0) or \
            target[1] not in (-1, example[0].numel()):
        raise UnsupportedLayerError(f"reshape to {target}: only flattening to (batch, -1)")
    return nn.Flatten()


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
                        ("Constant", _constant)):
    ONNX_OPS.register(_name, _convert)
