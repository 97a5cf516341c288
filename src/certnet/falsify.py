"""Falsification: projected gradient descent (Madry et al. 2018) over a box for an input
where an objective of the outputs is <= 0, e.g. a VNN-LIB property's violation
(:func:`certnet.decide.decide`). Only a search: what it finds is checked exactly elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: objective(outputs (B, K)) -> (B,): <= 0 where the outputs are what is searched for
Objective = Callable[[torch.Tensor], torch.Tensor]


def falsify(model: nn.Module, lo: torch.Tensor, hi: torch.Tensor, objective: Objective,
            steps: int = 50, restarts: int = 8, seed: int = 0) -> tuple[torch.Tensor, float]:
    """The input of the box [lo, hi] (shape (1, ...)) with the smallest objective found and
    that value: restart 0 from the centre, the others uniformly in the box, all restarts as
    one batch; l_inf signed-gradient steps of a quarter of the box's half-width, halved at
    50% and 75% of the steps; every iterate clamped into the box."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand((restarts, *lo.shape[1:]), generator=generator, dtype=lo.dtype)
    start = lo + (hi - lo) * noise.to(lo.device)
    start[0] = ((lo + hi) / 2)[0]
    x = start.clamp(lo, hi)
    step = (hi - lo) / 8
    best_x, best = x[:1].clone(), float("inf")
    for k in range(steps + 1):
        with torch.enable_grad():
            a = x.detach().requires_grad_(True)
            values = objective(model(a))
            (grad,) = torch.autograd.grad(values.sum(), a)
        values = values.detach()
        i = int(values.argmin())
        if float(values[i]) < best:
            best, best_x = float(values[i]), x[i:i + 1].detach().clone()
        if best <= 0 or k == steps:
            break
        scale = 0.5 ** ((k >= steps // 2) + (k >= 3 * steps // 4))
        x = (x.detach() - scale * step * grad.sign()).clamp(lo, hi)
    return best_x, best
