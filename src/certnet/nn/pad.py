"""Constant padding (issue 27): ``F.pad(x, padding, "constant", value)``, what torch's
``ZeroPad2d`` / ``ConstantPad2d`` (and their 1-d and 3-d forms), ``F.pad`` in a traced module
and ONNX ``Pad`` in constant mode compute. The padded entries are the constant, the others
copies of the input (negative entries crop): no arithmetic, so it is exact and 1-Lipschitz
in every norm. Reflect, replicate and circular padding are not this map and are refused by
the importers. Its bound rule is :mod:`certnet.bounds.rules.pad`; torch's own constant-pad
modules are registered with the same rule and converted to :class:`Pad` by
``convert_sequential``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.nn.layer_types import LayerType, register_layer_type

#: torch's constant-padding modules: forward is F.pad(x, self.padding, "constant", self.value)
TORCH_PADS: tuple[type[nn.Module], ...] = (
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d,
    nn.ZeroPad3d)


class Pad(nn.Module):
    """F.pad(x, padding, "constant", value): ``padding`` as F.pad takes it (pairs (before,
    after) from the last axis backwards; negative entries crop), never reaching the batch."""

    def __init__(self, padding: Sequence[int], value: float = 0.0) -> None:
        super().__init__()
        self.padding = tuple(int(p) for p in padding)
        self.value = float(value)
        if not self.padding or len(self.padding) % 2:
            raise InputError(f"Pad: an even, non-zero number of entries, got {list(padding)}")
        if not math.isfinite(self.value):
            raise InputError(f"Pad: the value {value!r} is not finite")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_padding(self.padding, x.shape, InputError)
        return F.pad(x, self.padding, "constant", self.value)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, value={self.value}"


def check_padding(padding: Sequence[int], shape: Sequence[int],
                  error: type[Exception] = UnsupportedLayerError) -> None:
    """``error`` unless F.pad's ``padding`` leaves the batch (axis 0 of ``shape``) alone and
    every padded axis non-empty."""
    axes = len(padding) // 2
    if axes > len(shape) - 1:
        raise error(f"padding {tuple(padding)} of {axes} axes on inputs of shape "
                    f"{tuple(shape)}: it would pad the batch")
    for k in range(axes):
        size = shape[len(shape) - 1 - k] + padding[2 * k] + padding[2 * k + 1]
        if size < 1:
            raise error(f"padding {tuple(padding)} leaves axis {len(shape) - 1 - k} of "
                        f"{tuple(shape)} empty")


def pad_of(m: nn.Module) -> tuple[tuple[int, ...], float]:
    """(padding, value) of a :class:`Pad` or one of :data:`TORCH_PADS`."""
    return tuple(int(p) for p in m.padding), float(m.value)


register_layer_type(LayerType(Pad, exact=True))
for _cls in TORCH_PADS:
    register_layer_type(LayerType(_cls, exact=True, convert=lambda m: Pad(*pad_of(m))))

__all__ = ["TORCH_PADS", "Pad", "check_padding", "pad_of"]
