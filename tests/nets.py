"""Small random networks shared by the oracle and certifier tests."""

import torch
from torch import nn

from certnet.nn.activations import MinMax


def random_mlp(seed: int, d: int, widths: list[int], act: str, classes: int,
               gain: float = 1.0) -> nn.Sequential:
    """Flatten, [Linear, act] * len(widths), Linear with hidden weights times ``gain`` (so the
    kinks fall inside small balls); the global RNG is left alone."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        modules: list[nn.Module] = [nn.Flatten()]
        prev = d
        for width in widths:
            linear = nn.Linear(prev, width)
            with torch.no_grad():
                linear.weight.mul_(gain)
                linear.bias.uniform_(-0.5 * gain, 0.5 * gain)
            modules += [linear, nn.ReLU() if act == "relu" else MinMax()]
            prev = width
        modules.append(nn.Linear(prev, classes))
        return nn.Sequential(*modules)
