"""A reshape that keeps the batch and the element order (issue 27): what ONNX ``Reshape``,
``Squeeze``, ``Unsqueeze`` and order-keeping ``Transpose`` nodes, and ``x.view(B, ...)`` in a
traced module, compute. No arithmetic: exact and 1-Lipschitz in every norm; its bound rule is
the Flatten rule's (the view of the ends, of the coefficients)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Len
from torch import nn

from certnet.errors import InputError
from certnet.nn.layer_types import LayerType, register_layer_type
from certnet.schema import Positive


class Reshape(nn.Module):
    """(B, ...) -> (B, *shape), the elements in the same order (``shape`` without the batch)."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if not self.shape or min(self.shape) < 1:
            raise InputError(f"Reshape needs positive sizes, got {list(shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[1:]) != math.prod(self.shape):
            raise InputError(f"Reshape to {self.shape} applied to {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


register_layer_type(LayerType(
    Reshape, "reshape", lambda m: {"shape": list(m.shape)},
    {"shape": Annotated[list[Positive], Len(1)]}, exact=True, reshape_only=True))
