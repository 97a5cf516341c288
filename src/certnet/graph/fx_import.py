"""Any ``nn.Module`` as a :class:`certnet.graph.Graph`, traced with ``torch.fx`` (issue 27):
a submodule of a registered layer type is kept as its node's operator (shared, not copied);
functions and tensor methods become operator modules through one table, :data:`FX_OPS`
(callable -> converter), as :data:`certnet.graph.onnx_import.ONNX_OPS` does for ONNX
operators. Arithmetic with a constant (a number, buffer or parameter, or a value computed from
them alone, which is folded), ``x * c``, ``x / c``, ``x + c``, ``x - c``, ``c - x``, becomes a
:class:`certnet.nn.scale.Scale`; ``F.pad`` in constant mode a :class:`certnet.nn.pad.Pad`.
The module must be in eval mode where that matters (dropout, BatchNorm), carry no
hooks, and trace without data-dependent control flow; anything else is one
:class:`UnsupportedLayerError` naming the node. The graph is checked to compute exactly the
module's function (``torch.equal`` on random inputs).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from certnet.errors import InputError, UnsupportedLayerError
from certnet.graph.graph import INPUT, Graph, Node
from certnet.graph.hints import hint
from certnet.graph.ops import Add, Concat
from certnet.nn.integrity import check_plain
from certnet.nn.layer_types import layer_type
from certnet.nn.linf_dist import Negate
from certnet.nn.pad import Pad, check_padding
from certnet.nn.reshape import Reshape
from certnet.nn.scale import Scale
from certnet.nn.smooth import Erf

#: the batch size of the example input whose per-node outputs the converters read
EXAMPLE_BATCH = 2
#: the batch of random inputs on which graph and module must agree exactly
CHECK_BATCH = 5
#: dropout modules: the identity in eval mode, random in training mode
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


class Plumbing:
    """A converter's answer for an integer read from a shape (``x.size(0)``, ``x.shape[0]``):
    no graph node; the reshape reading it checks it is the batch size."""


PLUMBING = Plumbing()


@dataclass
class Build:
    """The graph under construction: its nodes, the graph node computing each traced value
    (:data:`INPUT` for the input; constants and shape integers have none), and every traced
    node's output on the example input (batch of :data:`EXAMPLE_BATCH`)."""

    nodes: list[Node] = field(default_factory=list)
    ids: dict[fx.Node, int] = field(default_factory=dict)
    values: dict[fx.Node, Any] = field(default_factory=dict)

    def example(self, arg: Any) -> Any:
        """The example value of an argument: a traced node's output, or the literal."""
        return self.values[arg] if isinstance(arg, fx.Node) else arg

    def dynamic(self, node: fx.Node) -> list[fx.Node]:
        """The node's arguments computed from the network input, in order (repeats kept)."""
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs),
                        lambda a: found.append(a) if a in self.ids else None)
        return found


Converter = Callable[[fx.Node, Build], "nn.Module | Plumbing | None"]
#: function or ``torch.Tensor`` method -> converter(traced node, build): an operator module
#: applied to the node's computed inputs, None (the identity on its one input), or
#: :data:`PLUMBING`
FX_OPS: dict[Callable[..., Any], Converter] = {}


class _Tracer(fx.Tracer):
    """fx's tracer, keeping every registered certnet layer as one call (not traced into)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return layer_type(m) is not None or super().is_leaf_module(m, qualname)


class _Examples(fx.Interpreter):
    """Runs the traced graph, keeping every node's output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = super().run_node(n)
        return self.values[n]


def _name(fn: Any) -> str:
    """``torch.relu``, ``torch.nn.functional.relu``, ``Tensor.relu``, ``operator.add``."""
    if getattr(fn, "__qualname__", "").split(".")[0] in ("Tensor", "TensorBase"):
        return f"Tensor.{fn.__name__}"
    module = getattr(fn, "__module__", None) or ""
    module = {"_operator": "operator", "builtins": "", "torch._C._VariableFunctions":
              "torch", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    return f"{module}.{fn.__name__}" if module else fn.__name__


def _key(node: fx.Node) -> Callable[..., Any] | None:
    """The table key of a call_function / call_method node (``Tensor.view`` for x.view)."""
    if node.op == "call_method":
        return getattr(torch.Tensor, str(node.target), None)
    return node.target if callable(node.target) else None


def _where(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        what = f"{node.target}: {type(root.get_submodule(str(node.target))).__name__}"
    elif node.op == "call_method":
        what = f"Tensor.{node.target}"
    else:
        what = _name(node.target)
    return f"fx node {node.name!r} ({what})"


def _leaf(sub: nn.Module) -> nn.Module | None:
    """A called submodule's operator: itself if its exact type is registered, None (dropped)
    for dropout in eval mode."""
    if hasattr(sub, "parametrizations"):
        raise UnsupportedLayerError("parametrized: remove its parametrizations "
                                    "(torch.nn.utils.parametrize.remove_parametrizations)")
    if type(sub) in DROPOUTS:
        if sub.training:
            raise UnsupportedLayerError("dropout in training mode is random: call "
                                        "module.eval() first")
        return None
    if isinstance(sub, _BatchNorm) and sub.training:
        raise UnsupportedLayerError("BatchNorm in training mode normalises by the batch: call "
                                    "module.eval() first")
    if layer_type(sub) is None:
        raise UnsupportedLayerError(f"layer type {type(sub).__name__} is not supported (no "
                                    f"registered bound){hint(type(sub).__name__)}")
    return sub


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(module)
    except Exception as err:  # fx's TraceError, TypeError, RuntimeError, ... from forward
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsupportedLayerError(
            f"{type(module).__name__} could not be traced by torch.fx (data-dependent control "
            f"flow or Python on tensor values?): {why}") from None
    gm = fx.GraphModule(module, graph)
    gm.graph.eliminate_dead_code()
    return gm


def from_module(module: nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """The graph of ``module``'s forward on inputs of shape ``(batch, *input_shape)``, with
    the module's own registered submodules as operators. Call ``module.eval()`` first when it
    holds dropout or BatchNorm."""
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise InputError(f"input_shape {input_shape!r}: positive sizes, without the batch")
    check_plain(module)
    gm = _trace(module)
    fx_nodes = list(gm.graph.nodes)
    inputs = [n for n in fx_nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedLayerError(f"{type(module).__name__}.forward takes {len(inputs)} "
                                    "inputs; certnet reads networks of one input")
    for node in fx_nodes:  # refuse before running anything (training-mode BatchNorm updates)
        try:
            if node.op == "call_module":
                _leaf(gm.get_submodule(str(node.target)))
            elif node.op in ("call_function", "call_method") and _key(node) not in FX_OPS:
                raise UnsupportedLayerError(f"not supported{hint(_name(_key(node)))}; "
                                            "supported: " + ", ".join(
                    sorted({_name(f) for f in FX_OPS})))
        except UnsupportedLayerError as err:
            raise UnsupportedLayerError(f"{_where(node, gm)}: {err}") from None
    param = next((t for t in [*module.parameters(), *module.buffers()]
                  if t.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, *shape, generator=generator, dtype=dtype).to(device)
    runner = _Examples(gm)
    try:
        with torch.no_grad():
            runner.run(example)
    except Exception as err:
        raise InputError(f"{type(module).__name__} fails on inputs of shape (batch, "
                         f"{', '.join(map(str, shape))}): {str(err).splitlines()[0]}") from None
    build = Build(values=runner.values)
    build.ids[inputs[0]] = INPUT
    for node in fx_nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            _convert(node, gm, build)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out not in build.ids:
                raise UnsupportedLayerError(f"{type(module).__name__}.forward returns "
                                            f"{type(build.example(out)).__name__}, not one "
                                            "tensor computed from its input")
            if build.ids[out] == INPUT:
                raise UnsupportedLayerError(f"{type(module).__name__}.forward returns its "
                                            "input: no operator to certify")
            if build.ids[out] != len(build.nodes) - 1:
                raise UnsupportedLayerError(f"{type(module).__name__}: the output is not the "
                                            "last operator's")
    graph = Graph(build.nodes, shape)
    _check_same(module, graph, shape, dtype, device, generator)
    return graph


def _convert(node: fx.Node, gm: fx.GraphModule, build: Build) -> None:
    """Append ``node``'s operator to the graph (or map it to its input / to no value)."""
    where = _where(node, gm)
    try:
        out = (_leaf(gm.get_submodule(str(node.target))) if node.op == "call_module"
               else FX_OPS[_key(node)](node, build))  # type: ignore[index]
    except UnsupportedLayerError as err:
        raise UnsupportedLayerError(f"{where}: {err}") from None
    if out is PLUMBING:
        return
    dynamic = build.dynamic(node)
    if len(dynamic) != 1 and not isinstance(out, (Add, Concat)):
        raise UnsupportedLayerError(f"{where}: {len(dynamic)} inputs computed from the "
                                    "network input (certnet reads one here)")
    if out is None:
        build.ids[node] = build.ids[dynamic[0]]
        return
    assert isinstance(out, nn.Module)
    build.nodes.append(Node(out, tuple(build.ids[a] for a in dynamic), where))
    build.ids[node] = len(build.nodes) - 1


def _check_same(module: nn.Module, graph: Graph, shape: tuple[int, ...],
                dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> None:
    """Refuse unless graph and module give bit-identical outputs on random inputs: they run
    the same operators on the same values in the same order, so no float reordering differs."""
    x = torch.randn(CHECK_BATCH, *shape, generator=generator, dtype=dtype).to(device)
    with torch.no_grad():
        ours, theirs = graph(x), module(x)
    if not (isinstance(theirs, torch.Tensor) and ours.shape == theirs.shape and
            torch.equal(ours, theirs)):
        raise UnsupportedLayerError(
            f"the graph traced from {type(module).__name__} computes a different function "
            "than its forward (in-place updates of values used elsewhere, e.g. `y += x`, or "
            "state outside the trace?)")


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _relu(node: fx.Node, build: Build) -> nn.Module:
    inplace = node.target in ("relu_", torch.relu_, F.relu_) or bool(_arg(node, 1, "inplace"))
    return nn.ReLU(inplace=inplace)


def _flatten_batch(node: fx.Node, build: Build) -> nn.Flatten:
    """A Flatten, if ``node`` turns its input (B, ...) into (B, everything else) (checked on
    the example outputs)."""
    x, out = build.example(node.args[0]), build.values[node]
    if tuple(out.shape) != (x.shape[0], x[0].numel()):
        raise UnsupportedLayerError(
            f"reshapes {tuple(x.shape)} to {tuple(out.shape)} (batch {EXAMPLE_BATCH}); certnet "
            "flattens all dimensions but the batch only")
    return nn.Flatten()


def _is_batch_size(arg: Any) -> bool:
    """``x.size(0)``, ``x.size()[0]`` or ``x.shape[0]`` in the trace."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return _arg(arg, 1, "dim") == 0
    if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
        source = arg.args[0]
        return isinstance(source, fx.Node) and (
            (source.op == "call_method" and source.target == "size" and
             _arg(source, 1, "dim") is None) or
            (source.op == "call_function" and source.target is getattr and
             source.args[1] == "shape"))
    return False


def _reshape(node: fx.Node, build: Build) -> nn.Module:
    """``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``, ``x.view(-1, n)``: a
    Flatten; to other shapes keeping the batch, ``x.view(x.size(0), c, h, w)``, a
    :class:`Reshape`. The batch size must be read from a tensor or left to -1, never a
    literal, and no other size may be the batch's."""
    dims = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if len(dims) < 2 or not (dims[0] == -1 or _is_batch_size(dims[0])) or \
            not all(isinstance(d, int) or (isinstance(d, fx.Node) and not _is_batch_size(d))
                    for d in dims[1:]):
        raise UnsupportedLayerError(
            f"a reshape to {[a.name if isinstance(a, fx.Node) else a for a in dims]}; certnet "
            "reads x.view(x.size(0), ...), x.reshape(x.shape[0], ...) or x.view(-1, ...) only")
    if len(dims) == 2:
        return _flatten_batch(node, build)
    return _keep_batch(node, build)


def _keep_batch(node: fx.Node, build: Build) -> Reshape:
    """A Reshape, if ``node`` turns its input (B, ...) into (B, ...) of the same values in the
    same order (checked on the example outputs)."""
    x, out = build.example(node.args[0]), build.values[node]
    if out.dim() < 2 or out.shape[0] != x.shape[0] or out[0].numel() != x[0].numel():
        raise UnsupportedLayerError(
            f"reshapes {tuple(x.shape)} to {tuple(out.shape)} (batch {EXAMPLE_BATCH}); certnet "
            "reshapes within each point only")
    return Reshape(list(out.shape[1:]))


def _plumbing(node: fx.Node, build: Build) -> Plumbing:
    """``x.size()``, ``x.size(0)``, ``x.shape``, ``x.shape[0]``: integers for a reshape."""
    if isinstance(build.values[node], torch.Tensor) or \
            (node.target is getattr and node.args[1] != "shape"):
        raise UnsupportedLayerError("indexing tensors and reading their attributes are not "
                                    "supported (only sizes read to flatten)")
    for user in node.users:
        if _key(user) not in (operator.getitem, torch.Tensor.view, torch.Tensor.reshape,
                              torch.reshape):
            raise UnsupportedLayerError(f"a size used by {user.name!r}; certnet reads sizes "
                                        "only to flatten")
    return PLUMBING


def _computed(value: Any, build: Build) -> bool:
    """Whether an operand is computed from the network input (else a constant: a number, a
    buffer, a parameter, or a value folded from them)."""
    return isinstance(value, fx.Node) and value in build.ids


def _operands(node: fx.Node, build: Build, what: str) -> tuple[Any, Any, bool] | None:
    """(the computed operand, the constant one, whether the constant comes first) of a binary
    arithmetic node; None when both are constants (the node is then a constant too, its value
    the example run's)."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if _computed(a, build) and _computed(b, build):
        raise UnsupportedLayerError(f"{what} of two computed values: certnet reads it with a "
                                    "constant only (a number, buffer or parameter)")
    if not (_computed(a, build) or _computed(b, build)):
        return None
    return (a, b, False) if _computed(a, build) else (b, a, True)


def _constant(value: Any, node: fx.Node, build: Build) -> torch.Tensor:
    """A constant operand in the dtype the node computes in (a number or 0-d tensor is taken
    in it by torch too), so the graph computes what the module does, bit for bit."""
    value = build.example(value)
    out = build.values[node]
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise UnsupportedLayerError(f"an operand of type {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        return value.detach().to(out.dtype).clone()
    return torch.tensor(value, dtype=out.dtype, device=out.device)


def _scale_of(node: fx.Node, build: Build, x: fx.Node, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, divide: bool = False) -> Scale:
    """The :class:`Scale` computing ``node`` from its computed operand ``x``: the constants
    must broadcast over each point of ``x`` without changing its shape."""
    value, out = build.values[x], build.values[node]
    layer = Scale(weight, bias, divide)
    try:
        if not isinstance(out, torch.Tensor) or out.shape != value.shape:
            raise InputError(f"the result has shape {tuple(getattr(out, 'shape', ()))}, not "
                             f"the input's {tuple(value.shape)}")
        layer.operands(value)
    except InputError as err:
        raise UnsupportedLayerError(f"broadcasting a constant: {err}") from None
    return layer


def _add(node: fx.Node, build: Build) -> Add | Scale | Plumbing:
    """x + y of two computed values: a residual :class:`Add`; x + c, c + x: a Scale."""
    if _arg(node, 2, "alpha", 1) != 1:
        raise UnsupportedLayerError("an add with alpha")
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if _computed(a, build) and _computed(b, build):
        if build.values[a].shape != build.values[b].shape:
            raise UnsupportedLayerError(f"adding shapes {tuple(build.values[a].shape)} and "
                                        f"{tuple(build.values[b].shape)}: broadcasting is not "
                                        "supported")
        return Add()
    found = _operands(node, build, "a sum")
    if found is None:
        return PLUMBING
    x, c, _ = found
    return _scale_of(node, build, x, bias=_constant(c, node, build))


def _sub(node: fx.Node, build: Build) -> Scale | Plumbing:
    """x - c: x + (-c); c - x: x * -1 + c (both exactly the float difference)."""
    if _arg(node, 2, "alpha", 1) != 1:
        raise UnsupportedLayerError("a subtraction with alpha")
    found = _operands(node, build, "a difference")
    if found is None:
        return PLUMBING
    x, c, first = found
    c = _constant(c, node, build)
    if first:
        return _scale_of(node, build, x, weight=-torch.ones((), dtype=c.dtype), bias=c)
    return _scale_of(node, build, x, bias=-c)


def _mul(node: fx.Node, build: Build) -> Scale | Plumbing:
    """x * c, c * x: a Scale."""
    found = _operands(node, build, "a product")
    if found is None:
        return PLUMBING
    x, c, _ = found
    return _scale_of(node, build, x, weight=_constant(c, node, build))


def _div(node: fx.Node, build: Build) -> Scale | Plumbing:
    """x / c: a Scale that divides (never a product with a rounded 1 / c)."""
    if _arg(node, 2, "rounding_mode") is not None:
        raise UnsupportedLayerError("a division with a rounding mode (not affine)")
    found = _operands(node, build, "a quotient")
    if found is None:
        return PLUMBING
    x, c, first = found
    if first:
        raise UnsupportedLayerError("a constant divided by a computed value (1 / x is not "
                                    "affine); certnet divides by constants only")
    c = _constant(c, node, build)
    if bool((c == 0).any()):
        raise UnsupportedLayerError("a division by zero")
    return _scale_of(node, build, x, weight=c, divide=True)


def _neg(node: fx.Node, build: Build) -> Negate | Plumbing:
    """-x: a Negate (exact)."""
    return Negate() if _computed(_arg(node, 0, "input"), build) else PLUMBING


def _pad(node: fx.Node, build: Build) -> Pad | Plumbing:
    """``F.pad(x, pad, mode="constant", value)``: a :class:`Pad`, its value taken in the
    input's dtype (as F.pad takes it); other modes are refused."""
    x, padding = _arg(node, 0, "input"), _arg(node, 1, "pad")
    mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value")
    if not _computed(x, build):
        return PLUMBING
    if mode != "constant":
        raise UnsupportedLayerError(f"padding mode {mode!r}: certnet bounds constant padding "
                                    "only (reflect, replicate and circular padding are "
                                    "refused)")
    if not isinstance(padding, (list, tuple)) or \
            not all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
        raise UnsupportedLayerError(f"padding {padding!r}: integers written in the code only")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UnsupportedLayerError(f"a padding value {value!r} that is not a number")
    example = build.values[x]
    check_padding(padding, example.shape)
    return Pad(padding, float(torch.tensor(value or 0.0, dtype=example.dtype)))


def _cat(node: fx.Node, build: Build) -> Concat:
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    if not all(t in build.ids for t in tensors):
        raise UnsupportedLayerError("concatenating a constant is not supported")
    if dim % build.values[node].dim() != 1:
        raise UnsupportedLayerError(f"concatenating along dim {dim}; certnet concatenates "
                                    "along dim 1 (channels or features) only")
    return Concat(1)


def _dropout(node: fx.Node, build: Build) -> None:
    call = inspect.signature(node.target).bind(  # type: ignore[arg-type]
        *node.args, **node.kwargs)
    call.apply_defaults()
    if call.arguments["training"]:
        raise UnsupportedLayerError("dropout in training mode is random: call module.eval() "
                                    "first, or pass training=self.training")
    return None


def _flatten(node: fx.Node, build: Build) -> nn.Module:
    """``x.flatten(1)``: a Flatten; ``x.flatten(k)`` for k > 1 (the batch kept): a Reshape."""
    x, out = build.example(node.args[0]), build.values[node]
    if out.dim() > 2 and out.shape[0] == x.shape[0]:
        return _keep_batch(node, build)
    return _flatten_batch(node, build)


def _avg_pool2d(node: fx.Node, build: Build) -> nn.AvgPool2d:
    """``F.avg_pool2d``: the AvgPool2d module with its settings (it calls F.avg_pool2d)."""
    try:
        pool = nn.AvgPool2d(*node.args[1:], **node.kwargs)
    except TypeError as err:
        raise UnsupportedLayerError(f"arguments not read: {err}") from None
    if pool.ceil_mode or not pool.count_include_pad or pool.divisor_override:
        raise UnsupportedLayerError("average pooling with ceil_mode, count_include_pad=False "
                                    "or divisor_override: certnet has no bound for it")
    return pool


#: F.max_pool2d's and torch.max_pool2d's arguments after the input, in their order
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _max_pool2d(node: fx.Node, build: Build) -> nn.MaxPool2d:
    """``F.max_pool2d`` / ``torch.max_pool2d``: the MaxPool2d module with its settings (it
    calls F.max_pool2d; a stride of None or [] is the kernel's)."""
    given = {**dict(zip(_MAX_POOL_ARGS, node.args[1:], strict=False)), **node.kwargs}
    if len(node.args) > 1 + len(_MAX_POOL_ARGS) or set(given) - set(_MAX_POOL_ARGS) or \
            any(isinstance(v, fx.Node) for v in given.values()):
        raise UnsupportedLayerError(f"arguments not read: {node.args[1:]}, {node.kwargs}")
    if given.get("ceil_mode") or given.get("return_indices"):
        raise UnsupportedLayerError("max pooling with ceil_mode or return_indices: certnet "
                                    "has no bound for it")
    return nn.MaxPool2d(given["kernel_size"], given.get("stride") or None,
                        given.get("padding", 0), given.get("dilation", 1))


def _leaky_relu(node: fx.Node, build: Build) -> nn.LeakyReLU:
    """``F.leaky_relu(x, negative_slope, inplace)`` / ``F.leaky_relu_``: the LeakyReLU module
    (its rule refuses slopes outside [0, 1]), out of place: the graph's values are views of
    one state, and the graph is checked to compute the module's function."""
    slope = _arg(node, 1, "negative_slope", 0.01)
    if not isinstance(slope, (int, float)):
        raise UnsupportedLayerError(f"a negative slope {slope!r} that is not a number")
    return nn.LeakyReLU(slope)


for _fn in (F.max_pool2d, torch.max_pool2d):
    FX_OPS[_fn] = _max_pool2d
for _fn in (F.leaky_relu, F.leaky_relu_):
    FX_OPS[_fn] = _leaky_relu


for _fns, _convert_fn in (
        ((torch.relu, torch.relu_, F.relu, F.relu_, torch.Tensor.relu, torch.Tensor.relu_),
         _relu),
        ((torch.tanh, F.tanh, torch.Tensor.tanh), lambda node, build: nn.Tanh()),
        ((torch.flatten, torch.Tensor.flatten), _flatten),
        ((torch.Tensor.view, torch.Tensor.reshape, torch.reshape), _reshape),
        ((torch.Tensor.size, getattr, operator.getitem), _plumbing),
        ((operator.add, torch.add, torch.Tensor.add), _add),
        ((operator.sub, torch.sub, torch.Tensor.sub), _sub),
        ((operator.mul, torch.mul, torch.Tensor.mul), _mul),
        ((operator.truediv, torch.div, torch.Tensor.div), _div),
        ((operator.neg, torch.neg, torch.Tensor.neg), _neg),
        ((F.pad,), _pad),
        ((torch.cat, torch.concat, torch.concatenate), _cat),
        ((F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout), _dropout),
        ((torch.Tensor.contiguous,), lambda node, build: None),
        ((F.avg_pool2d,), _avg_pool2d)):
    for _fn in _fns:
        FX_OPS[_fn] = _convert_fn


def _gelu(node: fx.Node, build: Build) -> nn.GELU:
    """``F.gelu(x, approximate=...)``: the GELU module with that form (its rule refuses the
    tanh approximation)."""
    return nn.GELU(approximate=_arg(node, 1, "approximate", "none"))


for _fn in (torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid, torch.special.expit):
    FX_OPS[_fn] = lambda node, build: nn.Sigmoid()
for _fn in (torch.erf, torch.special.erf, torch.Tensor.erf):
    FX_OPS[_fn] = lambda node, build: Erf()
FX_OPS[F.gelu] = _gelu
FX_OPS[F.silu] = lambda node, build: nn.SiLU()
