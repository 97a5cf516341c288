"""alpha-CROWN (Xu et al. 2021, "Fast and Complete: Enabling Complete Neural Network
Verification with Rapid and Massively Parallel Incomplete Verifiers", §3.1): CROWN's lower
bound holds for *every* lower slope alpha in [0, 1] of an unstable ReLU, so the slopes of the
backward pass from the specification are optimised, per point, specification row and neuron,
by projected gradient ascent on the bound (Adam, as the paper). Every iterate's bound is sound;
the best per row is kept, CROWN's own bound (same slope choice, same intermediate bounds)
among them, so the result is never below it (rigorous: evaluated at CROWN's and the best
slopes). The intermediate bounds are the caller's (fixed); other activations keep their fixed
relaxation.
"""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.crown import backward_bound, relaxation_floor
from certnet.bounds.rules import LayerInput, Slope, rule_for
from certnet.optim import Adam
from certnet.threat import ThreatModel

#: Gradient steps on the slopes, and Adam's learning rate (alpha-CROWN's defaults are 20-100
#: steps at 0.1-0.5).
STEPS = 20
LEARNING_RATE = 0.1


def optimized_bound(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor,
                    x: torch.Tensor, threat: ThreatModel, slope: Slope = "adaptive",
                    steps: int = STEPS, lr: float = LEARNING_RATE, rigorous: bool = False
                    ) -> torch.Tensor:
    """Lower bound (B, S) on spec . output over the threat model around ``x`` (see
    :func:`backward_bound`), the lower slopes optimised for ``steps`` steps. ``rigorous``:
    the slopes are optimised on the plain float bound (the charges are ~1e-13 of it), and
    the rigorous bound is evaluated at CROWN's slopes and at each row's best slopes: the
    larger of two rigorous bounds is rigorous."""
    best = backward_bound(layers, seen, spec, x, threat, slope)
    floor = relaxation_floor(layers, len(layers))  # the backward passes stop there
    starts = {i: rule_for(m).slopes(m, seen[i], slope) for i, m in enumerate(layers)
              if i >= floor} if steps >= 1 else {}
    starts = {i: start for i, start in starts.items() if start is not None}  # CROWN's
    crown = backward_bound(layers, seen, spec, x, threat, slope, rigorous=True) \
        if rigorous else best
    if not starts:
        return crown
    rows = spec.shape[1]
    alphas = {}
    for i, start in starts.items():
        start = start.unsqueeze(1)
        alphas[i] = start.expand(-1, rows, *start.shape[2:]).clone().requires_grad_()
    # each row's best slopes, where the rigorous bound is evaluated at the end
    kept = {i: alpha.detach().clone() for i, alpha in alphas.items()} if rigorous else {}
    params = list(alphas.values())
    optimizer = Adam(params, lr=lr, maximize=True)
    for step in range(steps + 1):  # the last step's slopes are evaluated, not moved
        with torch.set_grad_enabled(step < steps):
            bound = backward_bound(layers, seen, spec, x, threat, slope, alphas=alphas)
            # gradients for the slopes only (the weights may require grad: left untouched)
            grads = torch.autograd.grad(bound.sum(), params) if step < steps else None
        better = bound.detach() > best
        best = torch.maximum(best, bound.detach())
        for i, slopes in kept.items():
            where = better.view(*better.shape, *([1] * (slopes.dim() - 2)))
            kept[i] = torch.where(where, alphas[i].detach(), slopes)
        if grads is None:
            break
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()
        with torch.no_grad():
            for param in params:
                param.clamp_(0.0, 1.0)
    if not rigorous:
        return best
    with torch.no_grad():
        return torch.maximum(crown, backward_bound(layers, seen, spec, x, threat, slope,
                                                   alphas=kept, rigorous=True))
