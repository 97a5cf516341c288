"""The ONNX ``Erf`` operator as a module (torch has none), for imported models (issue 27). Its
bound rule, with those of ``nn.Sigmoid``, ``nn.Tanh`` and ``nn.GELU``, is in
:mod:`certnet.bounds.rules.smooth` (of these only Tanh, an l_inf-dist net's head
activation, is stored in checkpoints)."""

from __future__ import annotations

import torch
from torch import nn


class Erf(nn.Module):
    """x -> erf(x) = 2 / sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.erf(x)
