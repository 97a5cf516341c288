"""Operators that join branches of a :class:`certnet.graph.Graph` (a residual sum, a
concatenation). The bounds engine reaches them through the graph's lowered chain
(:mod:`certnet.graph.lower`), whose step rules bound them (``certnet.bounds.rules.graph_step``);
:meth:`Graph.sequential` refuses a node with more than one input, naming it."""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """``a + b`` of two computed values of the same shape (a residual connection)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Concat(nn.Module):
    """``torch.cat(inputs, dim)`` (certnet builds it along dim 1: channels or features)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
