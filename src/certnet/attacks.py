"""Empirical attacks that test certificates from the other side.

:class:`PGD` is projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks") on the CW-style margin loss max_{j != y} z_j - z_y, in l2 or
l_inf, with random (and boundary) restarts and step-size decay. It needs only a module and the
threat model, so methods may use it in their losses and verifiers as a refuter;
:func:`certnet.audit.attack_report` sets it against certificates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.errors import ConfigError, InputError
from certnet.floats import round_down
from certnet.threat import check_eps, check_inputs, check_norm, norm_of, project


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW-style margin max_{j != y} z_j - z_y per point (> 0 iff another class wins)."""
    top_other = logits.scatter(1, y.unsqueeze(1), float("-inf")).max(1).values
    return top_other - logits.gather(1, y.unsqueeze(1)).squeeze(1)


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-point l2 or l_inf norm of a batch of perturbations, in float64."""
    return norm_of(delta.detach().double(), norm)


def _per_point(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against a (B, ...) batch."""
    return value.view(-1, *([1] * (like.dim() - 1)))


class PGD:
    """Projected gradient descent on the margin loss (Madry et al. 2018).

    ``attack = PGD(model, eps=0.3, norm="l2"); x_adv = attack(x, y)``. Restart 0 starts at x,
    odd restarts uniformly in the ball (l2 ball / l_inf box), even restarts on its boundary
    (l2 sphere / l_inf corners). Steps follow the normalised gradient (l2) or its sign (l_inf)
    with step ``step_size`` (default 2.5 * eps / steps), halved at 50% and 75% of the steps;
    every iterate is projected onto the eps-ball and the pixel box [0, 1]. Per point, the
    strongest iterate over all steps and restarts is returned: one that changes the label if
    any does, else the one with the largest margin loss. Points already flipped are not
    attacked again. ``eps`` may be a float or a (B,) tensor (one radius per point).
    Deterministic for a given ``seed``; leaves the model's train/eval modes unchanged.
    """

    def __init__(self, model: nn.Module, eps: float | torch.Tensor, norm: str = "l2",
                 steps: int = 100, restarts: int = 10, step_size: float | None = None,
                 seed: int = 0) -> None:
        check_norm(norm)
        for name, count in (("steps", steps), ("restarts", restarts)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{name} must be a positive integer, got {count!r}")
        if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
            raise ConfigError(f"step_size must be a positive number, got {step_size!r}")
        if isinstance(eps, torch.Tensor):
            if eps.dim() != 1 or not eps.is_floating_point() or not torch.isfinite(eps).all() \
                    or (eps < 0).any():
                raise InputError("a per-point eps must be a 1-D float tensor of finite values "
                                 ">= 0")
        else:
            check_eps(eps)
        self.model = model
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.restarts = restarts
        self.step_size = step_size
        self.seed = seed

    # -- public --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial examples for the batch ``x`` with labels ``y`` (same shape as ``x``)."""
        self._check(x, y)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                return self._attack(x.detach(), y.detach().to(x.device))
        finally:
            for m, mode in modes:
                m.training = mode

    # -- internals -----------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise InputError("x must be a batch tensor of shape (B, ...)")
        check_inputs(x, tuple(x.shape[1:]))
        if not isinstance(y, torch.Tensor) or y.dtype != torch.long or \
                tuple(y.shape) != (x.shape[0],):
            raise InputError(f"labels must be an int64 tensor of shape ({x.shape[0]},)")
        if isinstance(self.eps, torch.Tensor) and len(self.eps) != len(x):
            raise InputError(f"per-point eps has {len(self.eps)} entries for a batch of "
                             f"{len(x)}")

    def _logits_and_grad(self, adv: torch.Tensor, y: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            a = adv.clone().requires_grad_(True)
            logits = self.model(a)
            (grad,) = torch.autograd.grad(margin_loss(logits, y).sum(), a)
        return logits.detach(), grad

    def _project(self, adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Onto the eps-ball around x, then the pixel box (clipping never leaves the ball,
        since x itself lies in the box)."""
        return (x + project(adv - x, self.norm, eps)).clamp(0.0, 1.0)

    def _exact_fit(self, adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Undo float rounding of x + delta: the returned perturbations have norm <= eps when
        measured exactly (in float64); rows that cannot be fixed fall back to x."""
        eps64 = eps.double()
        for k in range(10):
            over = perturbation_norm(adv - x, self.norm) > eps64
            if not over.any():
                return adv
            if self.norm == "linf":
                e = _per_point(eps64, adv)
                bad = ((adv.double() - x.double()).abs() > e) & _per_point(over, adv)
                adv = torch.where(bad, torch.nextafter(adv, x), adv)
            else:
                n = perturbation_norm(adv - x, "l2")
                shrink = 1 - 1e-6 * 4**k  # rounding of x + delta may need a few tries
                scale = torch.where(over, eps64 / n.clamp_min(1e-300) * shrink, 1.0)
                adv = (x + (adv - x) * _per_point(scale.to(adv.dtype), adv)).clamp(0.0, 1.0)
        over = perturbation_norm(adv - x, self.norm) > eps64
        return torch.where(_per_point(over, adv), x, adv)

    def _start(self, restart: int, x: torch.Tensor, eps: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        if restart == 0:
            return x.clone()
        boundary = restart % 2 == 0
        # Noise is drawn on the CPU so that a seed gives the same starts on every device.
        shape = x.shape
        if self.norm == "linf":
            if boundary:
                noise = torch.randint(0, 2, shape, generator=generator).to(x.dtype) * 2 - 1
            else:
                noise = torch.rand(shape, generator=generator, dtype=x.dtype) * 2 - 1
        else:
            noise = torch.randn(shape, generator=generator, dtype=x.dtype)
            noise = noise / _per_point(noise.flatten(1).norm(dim=1).clamp_min(1e-30), noise)
            if not boundary:
                dim = noise[0].numel()
                radius = torch.rand(shape[0], generator=generator, dtype=x.dtype) ** (1 / dim)
                noise = noise * _per_point(radius, noise)
        return self._project(x + noise.to(x.device) * _per_point(eps, x), x, eps)

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        # the radius in x's dtype rounded down, so what _exact_fit fits to is never above the
        # caller's eps (rounding 0.1 to float32 to nearest would give 0.10000000149)
        exact = self.eps.detach().double() if isinstance(self.eps, torch.Tensor) else \
            torch.full((batch,), float(self.eps), dtype=torch.float64)
        eps = round_down(exact, x.dtype).to(x.device)
        step = 2.5 * eps / self.steps if self.step_size is None else \
            torch.full_like(eps, self.step_size)
        generator = torch.Generator().manual_seed(self.seed)

        logits = self.model(x)
        if y.min() < 0 or y.max() >= logits.shape[1]:
            raise InputError(f"labels must lie in [0, {logits.shape[1]})")
        best = x.clone()
        best_loss = margin_loss(logits, y)
        best_flip = logits.argmax(1) != y

        def record(idx: torch.Tensor, adv: torch.Tensor, logits: torch.Tensor) -> None:
            loss = margin_loss(logits, y[idx])
            flip = logits.argmax(1) != y[idx]
            old_flip = best_flip[idx]
            better = (flip & ~old_flip) | ((flip == old_flip) & (loss > best_loss[idx]))
            take = idx[better]
            best[take] = adv[better]
            best_loss[take] = loss[better]
            best_flip[take] = flip[better]

        for restart in range(self.restarts):
            # Draw the start for every point so restart r's noise does not depend on which
            # points earlier restarts flipped.
            start = self._start(restart, x, eps, generator)
            idx = (~best_flip).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa, ya, ea, adv = x[idx], y[idx], eps[idx], start[idx]
            found = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
            for t in range(self.steps + 1):
                logits, grad = self._logits_and_grad(adv, ya)
                record(idx, adv, logits)
                found |= logits.argmax(1) != ya
                if t == self.steps or found.all():
                    break
                decay = 1.0 if t < self.steps / 2 else 0.5 if t < 3 * self.steps / 4 else 0.25
                st = _per_point(step[idx] * decay, adv)
                if self.norm == "l2":
                    g = grad / _per_point(grad.flatten(1).norm(dim=1).clamp_min(1e-30), grad)
                else:
                    g = grad.sign()
                adv = self._project(adv + st * g, xa, ea)
        fitted = self._exact_fit(best, x, eps)
        return fitted.detach()
