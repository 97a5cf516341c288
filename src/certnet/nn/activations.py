"""1-Lipschitz activations."""

import torch
from torch import nn

from certnet.errors import InputError


class MinMax(nn.Module):
    """GroupSort with groups of 2 (Anil et al. 2019; "MinMax" in GloRo): sorts each pair of
    channels (c, c + C/2). A permutation of the input on every pair, hence 1-Lipschitz in
    every l_p norm and gradient-norm preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c % 2:
            raise InputError(f"MinMax needs an even number of channels, got {c}")
        a, b = x[:, : c // 2], x[:, c // 2 :]
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
