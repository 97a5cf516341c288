"""1-Lipschitz activations, all exact in floating point (comparisons and clamps only)."""

from typing import Annotated

import torch
from annotated_types import Len
from torch import nn

from certnet.errors import InputError
from certnet.nn import branchless
from certnet.nn.branchless import BITS, word_mask
from certnet.nn.layer_types import LayerType, register_layer_type
from certnet.schema import Positive


class _PairSort(torch.autograd.Function):
    """(a, b) -> (min(a, b), max(a, b)) per channel pair, saving one bool mask (which pairs
    swap) for a backward that routes each output's gradient to the input it came from: about
    2.5x faster than autograd through torch.minimum / maximum (benchmarks/gloro_step.py). At a
    tie the unswapped order is the subgradient; NaN propagates as in torch.minimum / maximum.
    Works under torch.func transforms (jacrev, vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        half = x.shape[1] // 2
        swap = x[:, :half] > x[:, half:]
        ctx.save_for_backward(swap)
        ctx.save_for_forward(swap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        """Input a gets the min's gradient unless the pair swaps (then the max's)."""
        (swap,) = ctx.saved_tensors
        return _swap_where(swap, grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        """The min's tangent is a's unless the pair swaps (then b's): the same routing."""
        (swap,) = ctx.saved_tensors
        return _swap_where(swap, tangent)


def _swap_where(swap: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The two halves of ``t`` exchanged where ``swap``: a pair sort is its own transpose.

    Computed on the integer views of the floats, d = (low ^ high) & -swap, then (low ^ d,
    high ^ d): the same bits as ``torch.where`` (NaN, inf and -0.0 included) without its
    branch per element, which an unpredictable mask such as this one mispredicts half the time
    on the CPU (measured on 346k float32 elements: where 1.1 ms, with a sorted mask 0.14 ms,
    the bitwise form 0.13 ms). Under ``create_graph`` (grad mode on in the backward) it stays
    differentiable: ``torch.where``."""
    half = t.shape[1] // 2
    if torch.is_grad_enabled():
        low, high = t[:, :half], t[:, half:]
        return torch.cat([torch.where(swap, high, low), torch.where(swap, low, high)], dim=1)
    bits = t.view(BITS[t.element_size()])
    low, high = bits[:, :half], bits[:, half:]
    d = (low ^ high) & word_mask(swap, bits.dtype)  # all bits set where the pair swaps
    return torch.cat([low ^ d, high ^ d], dim=1).view(t.dtype)


class MinMax(nn.Module):
    """GroupSort with groups of 2 (Anil et al. 2019; "MinMax" in GloRo): sorts each pair of
    channels (c, c + C/2). A permutation of the input on every pair, hence 1-Lipschitz in
    every l_p norm and gradient-norm preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c % 2:
            raise InputError(f"MinMax needs an even number of channels, got {c}")
        if not torch.is_grad_enabled():  # no backward to prepare for: skip the swap mask
            return _PairSort.forward(x)
        return _PairSort.apply(x)


def _check_shape(layer: nn.Module, x: torch.Tensor) -> None:
    if tuple(x.shape[1:]) != layer.shape:
        raise InputError(f"{type(layer).__name__} for inputs {layer.shape} applied to "
                         f"{tuple(x.shape[1:])}")


class ClippedReLU(nn.Module):
    """clamp(min(x, t), 0) with a learnable threshold t per neuron (Huang et al. 2021,
    "Training Certifiably Robust Neural Networks with Efficient Local Lipschitz Bounds", §4):
    constant, so locally 0-Lipschitz, wherever x <= 0 or x >= t. ``shape`` is one input's shape
    (C, H, W) or (C,); ``project_`` keeps t >= 0 (the Trainer calls it after every step)."""

    def __init__(self, shape: list[int], init: float = 1.0) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.threshold = nn.Parameter(torch.full(self.shape, float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(self, x)
        return branchless.clamp(branchless.minimum(x, self.threshold), min=0)

    @torch.no_grad()
    def project_(self) -> None:
        self.threshold.clamp_(min=0)


class ClippedMinMax(nn.Module):
    """MinMax with the min of each pair clipped from below at a learnable ``lower`` and the max
    clipped from above at a learnable ``upper`` (Huang et al. 2021's clamped MaxMin): a sort
    then a clamp per output, so 1-Lipschitz for any thresholds, and constant where the pair's
    min stays below ``lower`` (resp. its max above ``upper``). ``shape`` is one input's shape
    (C even); the thresholds have one entry per pair and position."""

    def __init__(self, shape: list[int], lower: float = -3.0, upper: float = 3.0) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if self.shape[0] % 2:
            raise InputError(f"ClippedMinMax needs an even number of channels, got {shape}")
        half = (self.shape[0] // 2, *self.shape[1:])
        self.lower = nn.Parameter(torch.full(half, float(lower)))
        self.upper = nn.Parameter(torch.full(half, float(upper)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(self, x)
        c = x.shape[1] // 2
        a, b = x[:, :c], x[:, c:]
        return torch.cat([branchless.maximum(branchless.minimum(a, b), self.lower),
                          branchless.minimum(branchless.maximum(a, b), self.upper)], dim=1)


#: the shape of a clipped activation's thresholds
SHAPE = {"shape": Annotated[list[Positive], Len(1)]}
register_layer_type(LayerType(MinMax, "minmax", exact=True))
register_layer_type(LayerType(ClippedReLU, "clipped_relu", lambda m: {"shape": list(m.shape)},
                              SHAPE, exact=True))
register_layer_type(LayerType(ClippedMinMax, "clipped_minmax",
                              lambda m: {"shape": list(m.shape)}, SHAPE, exact=True))
