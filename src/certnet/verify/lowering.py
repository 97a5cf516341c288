"""A network as float64 operations on the flattened input: affine (Flatten, Reshape,
(Lipschitz)Linear, (Lipschitz, residual) Conv2d and AvgPool2d as their dense matrices,
eval-mode BatchNorm / MeanShift, Normalize, Negate, constant padding, elementwise arithmetic
with constants), ReLU and MinMax. Clipped forms are rewritten
exactly with ReLUs: clamp(min(z, t), 0) = relu(t - relu(t - z)), max(m, l) = l + relu(m - l),
min(M, u) = u - relu(u - M); LeakyReLU as relu(z) - a relu(-z), MaxPool2d as a tree of
MinMax pairs per window. A graph's chain (:mod:`certnet.graph.lower`) lowers step by step,
its kept slots carried through each operator's nonlinearities (:func:`_step`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certnet.errors import UnsupportedLayerError
from certnet.graph.lower import Step
from certnet.graph.ops import Add, Concat
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import MeanShift, Negate
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    batchnorm_affine,
    check_batchnorm,
)
from certnet.nn.pad import TORCH_PADS, Pad, check_padding, pad_of
from certnet.nn.reshape import Reshape
from certnet.nn.scale import Scale

Op = tuple  # ("affine", W, b) | ("relu",) | ("minmax",)


#: exact module class -> its lowering: (layer, input shape) -> (ops, output shape)
Lowering = Callable[[nn.Module, tuple[int, ...]], tuple[list[Op], tuple[int, ...]]]
LOWERINGS: dict[type[nn.Module], Lowering] = {}


def lowering(*classes: type[nn.Module]) -> Callable[[Lowering], Lowering]:
    """Decorator: the exact lowering of modules of exactly these classes (a new layer type
    registers its own, beside the rest of its description)."""
    def register(fn: Lowering) -> Lowering:
        LOWERINGS.update(dict.fromkeys(classes, fn))
        return fn
    return register


def network_ops(layers: nn.Module, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """Flatten ``layers`` (acting on one point of ``shape``) into affine / relu / minmax
    operations on the flattened vector; returns them and the output shape."""
    ops: list[Op] = []
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        lower = LOWERINGS.get(type(layer))
        if lower is None:
            raise UnsupportedLayerError(
                f"verify: no exact encoding for layer {type(layer).__name__} (supported: "
                f"{', '.join(sorted(c.__name__ for c in LOWERINGS))})")
        sub, shape = lower(layer, shape)
        ops += sub
    return ops, shape


lowering(nn.Sequential)(network_ops)
lowering(nn.Identity)(lambda layer, shape: ([], shape))


@lowering(nn.Flatten)
def _flatten(layer: nn.Flatten, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise UnsupportedLayerError("verify: only Flatten(start_dim=1, end_dim=-1)")
    return [], (int(np.prod(shape)),)


@lowering(Reshape)
def _reshape(layer: Reshape, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if int(np.prod(shape)) != int(np.prod(layer.shape)):
        raise UnsupportedLayerError(f"verify: Reshape to {layer.shape} applied to {shape}")
    return [], layer.shape


@lowering(nn.Linear, LipschitzLinear)
def _linear(layer: nn.Linear, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if len(shape) != 1 or shape[0] != layer.in_features:
        raise UnsupportedLayerError(
            f"verify: Linear({layer.in_features}, ...) applied to shape {shape}; flatten first")
    w = layer.weight.detach().to(torch.float64).cpu().numpy()
    b = np.zeros(w.shape[0]) if layer.bias is None else _flat(layer.bias)
    return [("affine", w, b)], (layer.out_features,)


lowering(nn.ReLU)(lambda layer, shape: ([("relu",)], shape))


@lowering(MinMax)
def _minmax(layer: MinMax, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    # channels c and c + C/2 (dim 0 of one point) are i and i + N/2 once flattened.
    if shape[0] % 2:
        raise UnsupportedLayerError(f"verify: MinMax on {shape[0]} (odd) channels")
    return [("minmax",)], shape


lowering(ClippedReLU)(lambda layer, shape: (_clipped_relu_ops(_flat(layer.threshold)), shape))
lowering(ClippedMinMax)(lambda layer, shape: (
    [("minmax",), *_clamp_halves_ops(_flat(layer.lower), _flat(layer.upper))], shape))


@lowering(nn.Conv2d, LipschitzConv2d, ResidualConv2d)
def _conv_affine(layer: nn.Conv2d, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """A convolution on one point of ``shape`` (C, H, W) as the dense affine operation on the
    flattened vector, and its output shape: column k is the kernel (``effective_weight`` for
    certnet's layers) applied to the k-th basis image, exact in float64 (one product per entry,
    the rest zeros)."""
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise UnsupportedLayerError(
            f"verify: Conv2d({layer.in_channels}, ...) applied to shape {shape}")
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros" or \
            isinstance(layer.padding, str):
        raise UnsupportedLayerError("verify: only zero-padded convolutions without groups, "
                                    "dilation or string padding")
    weight = (layer.effective_weight() if isinstance(layer, LipschitzConv2d) else
              layer.weight).detach().to(torch.float64).cpu()
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        columns = F.conv2d(basis, weight, None, layer.stride, layer.padding)
    bias = np.zeros(columns[0].numel()) if layer.bias is None else \
        np.repeat(_flat(layer.bias), columns[0, 0].numel())
    return [("affine", columns.reshape(n, -1).T.numpy(), bias)], tuple(columns.shape[1:])


def _channelwise(scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, ...]
                 ) -> list[Op]:
    """x * scale + shift with one (scale, shift) per channel (dim 0 of ``shape``)."""
    per = int(np.prod(shape[1:]))
    return [("affine", np.diag(np.repeat(_flat(scale), per)), np.repeat(_flat(shift), per))]


@lowering(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(layer: nn.Module, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if layer.training or shape[0] != layer.num_features:
        raise UnsupportedLayerError(f"verify: {type(layer).__name__} in training mode or on "
                                    f"shape {shape}")
    check_batchnorm(layer, f"verify: {type(layer).__name__}")
    return _channelwise(*batchnorm_affine(layer), shape), shape


@lowering(MeanShift)
def _mean_shift(layer: MeanShift, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if layer.training or shape[0] != layer.num_features:
        raise UnsupportedLayerError(f"verify: MeanShift in training mode or on shape {shape}")
    mean = layer.running_mean.detach().double()
    return _channelwise(torch.ones_like(mean), -mean, shape), shape


@lowering(Normalize)
def _normalize(layer: Normalize, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    mean, std = layer.mean.detach().double().view(-1), layer.std.detach().double().view(-1)
    if len(shape) != 3 or mean.numel() not in (1, shape[0]):
        raise UnsupportedLayerError(f"verify: Normalize of {mean.numel()} channels on {shape}")
    mean, std = mean.expand(shape[0]), std.expand(shape[0])
    return _channelwise(1 / std, -mean / std, shape), shape


lowering(Negate)(lambda layer, shape: ([("affine", -np.eye(int(np.prod(shape))),
                                         np.zeros(int(np.prod(shape))))], shape))


@lowering(nn.AvgPool2d)
def _avg_pool(layer: nn.AvgPool2d, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """The pooling's dense matrix: column k is the pooling of the k-th basis image."""
    if len(shape) != 3:
        raise UnsupportedLayerError(f"verify: AvgPool2d on shape {shape}")
    n = int(np.prod(shape))
    with torch.no_grad():
        columns = layer(torch.eye(n, dtype=torch.float64).view(n, *shape))
    return [("affine", columns.reshape(n, -1).T.numpy(), np.zeros(columns[0].numel()))], \
        tuple(columns.shape[1:])


@lowering(nn.LeakyReLU)
def _leaky_relu(layer: nn.LeakyReLU, shape: tuple[int, ...]
                ) -> tuple[list[Op], tuple[int, ...]]:
    """relu(z) - a relu(-z): z where z > 0, a z elsewhere, for any slope a (exact)."""
    eye = np.eye(int(np.prod(shape)))
    return [_affine(np.concatenate([eye, -eye])), ("relu",),
            _affine(np.concatenate([eye, -float(layer.negative_slope) * eye], 1))], shape


@lowering(nn.MaxPool2d)
def _max_pool(layer: nn.MaxPool2d, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """Each window's max (over its inputs inside the map: torch pads with -inf) as a tree of
    pairwise maxes: every round pairs each window's candidates (an odd one with itself) into
    [a; b], a MinMax sorts the pairs (max(a, b) = b + relu(a - b)), and the maxima are the
    next candidates; exact."""
    if len(shape) != 3 or layer.return_indices or layer.ceil_mode:
        raise UnsupportedLayerError(f"verify: MaxPool2d on shape {shape} (return_indices and "
                                    "ceil_mode are not encoded)")
    n = int(np.prod(shape))
    with torch.no_grad():  # input index + 1 at each window entry, 0 where it is padding
        ids = torch.arange(1, n + 1, dtype=torch.float64).view(shape[0], 1, *shape[1:])
        cols = F.unfold(ids, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        out_shape = tuple(layer(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    windows = [[int(v) - 1 for v in cols[c, :, o] if v > 0]
               for c in range(cols.shape[0]) for o in range(cols.shape[2])]
    if len(windows) != int(np.prod(out_shape)) or not all(windows):
        raise UnsupportedLayerError(f"verify: MaxPool2d windows on shape {shape}")
    ops: list[Op] = []
    width = n
    while any(len(w) > 1 for w in windows):
        firsts, seconds, rounds = [], [], []
        for w in windows:
            rounds.append(range(len(firsts), len(firsts) + (len(w) + 1) // 2))
            firsts += w[::2]
            seconds += w[1::2] + w[-1:] * (len(w) % 2)
        pairs = len(firsts)
        gather = np.zeros((2 * pairs, width))
        gather[np.arange(2 * pairs), firsts + seconds] = 1.0
        ops += [_affine(gather), ("minmax",)]
        windows = [[pairs + i for i in r] for r in rounds]  # the maxima: the second half
        width = 2 * pairs
    pick = np.zeros((len(windows), width))
    pick[np.arange(len(windows)), [w[0] for w in windows]] = 1.0
    return [*ops, _affine(pick)], out_shape


@lowering(Pad, *TORCH_PADS)
def _pad(layer: nn.Module, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """Constant padding as the 0/1 matrix copying each kept input and the constant where
    padded: column k is the zero-padded k-th basis vector, the bias the padded zero input
    (exact)."""
    padding, value = pad_of(layer)
    check_padding(padding, (1, *shape))
    n = int(np.prod(shape))
    with torch.no_grad():
        columns = F.pad(torch.eye(n, dtype=torch.float64).view(n, *shape), padding)
        bias = F.pad(torch.zeros(1, *shape, dtype=torch.float64), padding, value=value)
    return [("affine", columns.reshape(n, -1).T.numpy(), bias.reshape(-1).numpy())], \
        tuple(columns.shape[1:])


@lowering(Scale)
def _scale(layer: Scale, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """x * w + b as diag(w) x + b (exact); x / w + b as diag(1 / w) x + b, 1 / w rounded
    once (as Normalize's 1 / std)."""
    like = torch.zeros(1, *shape, dtype=torch.float64)
    weight, bias = layer.operands(like)
    scale = torch.ones_like(like) if weight is None else \
        torch.broadcast_to(weight.detach().double().cpu(), like.shape)
    if layer.divide:
        scale = 1 / scale
    shift = torch.zeros_like(like) if bias is None else \
        torch.broadcast_to(bias.detach().double().cpu(), like.shape)
    return [("affine", np.diag(_flat(scale)), _flat(shift))], shape


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1)


def _clipped_relu_ops(t: np.ndarray) -> list[Op]:
    """clamp(min(z, t), 0) = relu(t - relu(t - z)), for any threshold t."""
    flip = -np.eye(t.size)
    return [("affine", flip, t), ("relu",), ("affine", flip, t), ("relu",)]


def _clamp_halves_ops(lower: np.ndarray, upper: np.ndarray) -> list[Op]:
    """[m; M] -> [max(m, lower); min(M, upper)] = [lower + relu(m - lower); upper -
    relu(upper - M)]."""
    sign = np.diag(np.concatenate([np.ones(lower.size), -np.ones(upper.size)]))
    return [("affine", sign, np.concatenate([-lower, upper])), ("relu",),
            ("affine", sign, np.concatenate([lower, upper]))]


def _affine(w: np.ndarray, b: np.ndarray | None = None) -> Op:
    return ("affine", w, np.zeros(w.shape[0]) if b is None else b)


def _compose(ops: list[Op]) -> list[Op]:
    """``ops`` with each run of consecutive affine operations composed into one."""
    out: list[Op] = []
    for op in ops:
        if op[0] == "affine" and out and out[-1][0] == "affine":
            out[-1] = ("affine", op[1] @ out[-1][1], op[1] @ out[-1][2] + op[2])
        else:
            out.append(op)
    return out


def _join_ops(op: nn.Module, shapes: list[tuple[int, ...]]
              ) -> tuple[list[Op], tuple[int, ...]]:
    """The operator of a graph node on the concatenation of its flattened inputs: Add sums
    them, Concat permutes them as torch.cat does, a one-input operator lowers as a layer."""
    sizes = [int(np.prod(s)) for s in shapes]
    if isinstance(op, Add) and len(shapes) == 2:
        if shapes[0] != shapes[1]:
            raise UnsupportedLayerError(f"verify: Add of shapes {shapes[0]} and {shapes[1]}")
        eye = np.eye(sizes[0])
        return [_affine(np.concatenate([eye, eye], 1))], shapes[0]
    if isinstance(op, Concat):
        dim = op.dim if op.dim >= 0 else op.dim + len(shapes[0]) + 1
        if dim < 1 or any(len(s) != len(shapes[0]) for s in shapes):
            raise UnsupportedLayerError(f"verify: Concat(dim={op.dim}) of shapes {shapes}")
        starts = np.cumsum([0, *sizes])
        index = torch.cat([torch.arange(int(a), int(a) + n).view(1, *s)
                           for a, n, s in zip(starts, sizes, shapes, strict=False)], dim)
        return [_affine(np.eye(starts[-1])[index.reshape(-1).numpy()])], \
            tuple(index.shape[1:])
    if len(shapes) != 1:
        raise UnsupportedLayerError(f"verify: no exact encoding for {type(op).__name__} of "
                                    f"{len(shapes)} inputs (supported: Add, Concat)")
    return network_ops(op, shapes[0])


@lowering(Step)
def _step(step: Step, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """One step of a graph's chain on the whole flat state: gather the op's input slots and
    the kept slots [u; K], run the op's own operations on u while K rides along, output
    [K; op(u)] (``last``: op(u)). Across a ReLU K travels as [relu(K); relu(-K)] (K =
    relu(K) - relu(-K)); across a MinMax, which sorts coordinates i and i + N/2, as the pairs
    (K, K), which it leaves alone. Consecutive affine operations are composed; exact."""
    if int(np.prod(shape)) != sum(step.sizes):
        raise UnsupportedLayerError(f"verify: a graph step over slots {step.shapes} applied "
                                    f"to shape {shape}")
    starts = np.cumsum([0, *step.sizes])
    rows = np.eye(int(starts[-1]))
    slots = [rows[starts[i]:starts[i + 1]] for i in range(len(step.sizes))]
    inner, out_shape = _join_ops(step.op, [step.shapes[i] for i in step.inputs])
    kept = 0 if step.last else sum(step.sizes[k] for k in step.keep)
    gather = np.concatenate([*(slots[i] for i in step.inputs),
                             *(slots[k] for k in step.keep if not step.last)])
    ops, width = [_affine(gather)], gather.shape[0] - kept
    eye_k = np.eye(kept)
    for op in inner:
        if op[0] == "affine":
            w = np.zeros((op[1].shape[0] + kept, width + kept))
            w[: op[1].shape[0], :width], w[op[1].shape[0]:, width:] = op[1], eye_k
            ops.append(_affine(w, np.concatenate([op[2], np.zeros(kept)])))
            width = op[1].shape[0]
        elif not kept:
            ops.append(op)
        elif op[0] == "relu":  # [u; K] -> [u; K; -K] -> relu -> [u'; relu(K) - relu(-K)]
            eye_u = np.eye(width)
            ops += [_affine(np.block([[eye_u, np.zeros((width, kept))],
                                      [np.zeros((kept, width)), eye_k],
                                      [np.zeros((kept, width)), -eye_k]])), op,
                    _affine(np.block([[eye_u, np.zeros((width, 2 * kept))],
                                      [np.zeros((kept, width)), eye_k, -eye_k]]))]
        elif op[0] == "minmax":  # [a; b; K] -> [a; K; b; K] -> sort -> [min; max; K]
            h = width // 2
            eye = np.eye(width + kept)
            a, b, k = eye[:h], eye[h:width], eye[width:]
            ops += [_affine(np.concatenate([a, k, b, k])), op]
            eye = np.eye(width + 2 * kept)
            ops.append(_affine(np.concatenate([eye[:h], eye[h + kept: width + kept],
                                               eye[h: h + kept]])))
        else:
            raise UnsupportedLayerError(f"verify: graph step with a {op[0]!r} operation")
    if step.last:
        return _compose(ops), out_shape
    eye = np.eye(width + kept)
    ops.append(_affine(np.concatenate([eye[width:], eye[:width]])))  # [u'; K] -> [K; u']
    return _compose(ops), (kept + width,)
