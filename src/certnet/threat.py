"""The threat model as a value: a norm ball of radius eps intersected with the pixel box.

Every part of certnet that reasons about perturbations (the bounds engine, the Lipschitz
certificate, PGD, the exact oracle, reports) takes its norm, dual norm, projection and box from
here, so a model's training norm is only its default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from certnet.errors import ConfigError, InputError
from certnet.floats import SQRT_TINY64, eta, gamma, outward, outward_to

Norm = Literal["l2", "linf"]
NORMS: tuple[Norm, ...] = ("l2", "linf")


def check_norm(norm: str) -> Norm:
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose from {NORMS}")
    return norm  # type: ignore[return-value]


def check_eps(eps: float) -> None:
    """Refuse anything that is not a finite number >= 0 (booleans included)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0) or \
            eps == float("inf"):
        raise InputError(f"epsilon must be a finite number >= 0, got {eps!r}")


def norm_of(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row ``norm`` (l1, l2 or linf) of a (B, ...) tensor, over all but the first dim."""
    flat = v.flatten(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    if norm == "l1":
        return flat.abs().sum(dim=1)
    raise ConfigError(f"unknown norm {norm!r}")


def from_l2_radius(radius: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Largest ``norm`` radius whose ball lies inside the l2 ball of ``radius`` (rounded down)."""
    if check_norm(norm) == "l2":
        return radius
    scaled = radius / math.sqrt(dim)
    return torch.nextafter(scaled, torch.zeros_like(scaled))


def implausible(eps: float, norm: str, dim: int) -> str | None:
    """Why a radius makes no sense for inputs in [0, 1]^dim (None if it may): a ball that
    holds the whole pixel box, where nothing can be certified."""
    diameter = 1.0 if norm == "linf" else math.sqrt(dim)
    if eps >= diameter:
        return (f"eps {eps:g} in {norm} holds the whole pixel box [0, 1]^{dim} (its diameter "
                f"is {diameter:.4g}): no point can be certified; radii are in pixel units of "
                "[0, 1], e.g. 8/255 for eight grey levels")
    return None


def project(delta: torch.Tensor, norm: str, eps: torch.Tensor) -> torch.Tensor:
    """The perturbations ``delta`` (B, ...) projected onto the ``norm`` balls of per-point
    radii ``eps`` (B,)."""
    shape = (-1, *([1] * (delta.dim() - 1)))
    if check_norm(norm) == "l2":
        n = delta.flatten(1).norm(dim=1)
        return delta * (eps / n.clamp_min(1e-30)).clamp(max=1.0).view(shape)
    e = eps.view(shape)
    return torch.maximum(torch.minimum(delta, e), -e)


@dataclass(frozen=True)
class ThreatModel:
    """{x' : ||x' - x||_norm <= eps, lower <= x' <= upper} around each point of a batch."""

    norm: Norm
    eps: float
    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self) -> None:
        check_norm(self.norm)
        check_eps(self.eps)

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x +- eps clipped to [lower, upper]: the set itself for l_inf, the smallest box that
        contains it for l2 (each end rounded to nearest: training's box)."""
        return ((x - self.eps).clamp(self.lower, self.upper),
                (x + self.eps).clamp(self.lower, self.upper))

    def enclosure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`box` rounded outward: it contains every real x' of the set around x."""
        lo, hi = outward(x - self.eps, x + self.eps)
        return lo.clamp(self.lower, self.upper), hi.clamp(self.lower, self.upper)

    def concretize(self, x: torch.Tensor, lam: torch.Tensor, rigorous: bool = False
                   ) -> torch.Tensor:
        """A lower bound of lam . x' over the set around each point, lam of shape
        (B, S, *x.shape[1:]) -> (B, S). l_inf: the exact minimum over the clipped box,
        lam . c - |lam| . r; l2: lam . x - eps ||lam||_2 (the dual norm; the pixel box only
        shrinks the set, so ignoring it stays sound). ``rigorous``: minus a bound on the
        rounding of the float evaluation itself (so the value is below the real minimum)."""
        flat = lam.flatten(2)
        if self.norm == "linf":
            lo, hi = self.enclosure(x) if rigorous else self.box(x)
            return box_minimum(flat, lo, hi, rigorous)
        dot = (flat @ x.flatten(1).unsqueeze(2)).squeeze(2)
        norm = flat.norm(dim=2)
        if not rigorous:
            return dot - self.eps * norm
        # |error| <= gamma_{n+3} (|lam| . |x| + eps ||lam||_1) (two dot products, the root of
        # the squares, the product with eps, the subtraction) plus the squares' underflow
        n = flat.shape[2]
        size = x.flatten(1).abs() + self.eps
        error = gamma(n + 6, lam.dtype) * (flat.abs() @ size.unsqueeze(2)).squeeze(2) + \
            3 * (n + 2) * eta(lam.dtype)  # the products' underflow
        return dot - self.eps * (norm + n**0.5 * SQRT_TINY64) - error


@dataclass(frozen=True, eq=False)
class BoxThreat(ThreatModel):
    """One box {x' : lo <= x' <= hi} (``lo``, ``hi`` of shape (1, *input), exact floats: a
    VNN-LIB input constraint rounded outward), the same set for every point of a batch, which
    only gives the clean points. The bounds engine bounds it as an l_inf set (``norm`` is
    "linf"; ``eps`` is half its widest side, for reports). Build it with :meth:`of`."""

    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    #: what the bounds read of the box again and again (its enclosure in a dtype, its centre
    #: and radius), computed once: the box never changes
    _kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, lo: torch.Tensor, hi: torch.Tensor) -> BoxThreat:
        if lo.shape != hi.shape or not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()
                                            & (lo <= hi).all()):
            raise InputError("a box needs finite lo <= hi of the same shape")
        eps = float(((hi - lo) / 2).max()) if lo.numel() else 0.0
        return cls("linf", eps, -math.inf, math.inf, lo.unsqueeze(0), hi.unsqueeze(0))

    def center(self) -> torch.Tensor:
        """A point of the box (its centre, clamped into it against rounding), batch of one."""
        return ((self.lo + self.hi) / 2).clamp(self.lo, self.hi)

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo.to(x).expand_as(x), self.hi.to(x).expand_as(x)

    def enclosure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._once(("enclosure", x.dtype, x.device), lambda: outward_to(
            self.lo.to(x.device), self.hi.to(x.device), x.dtype))
        return lo.expand_as(x), hi.expand_as(x)  # exact in float64: the set itself

    def concretize(self, x: torch.Tensor, lam: torch.Tensor, rigorous: bool = False
                   ) -> torch.Tensor:
        """The exact minimum of lam . x' over the box (``rigorous``: a lower bound of it in
        floating point): the same box for every point, so its terms are computed once."""
        def terms() -> tuple[torch.Tensor, torch.Tensor, float]:
            lo, hi = self.enclosure(x[:1]) if rigorous else self.box(x[:1])
            return box_terms(lo, hi, rigorous)
        center, radius, lost = self._once(("terms", rigorous, x.dtype, x.device), terms)
        batch = (len(x), -1, -1)
        return box_minimum_of(lam, (center.expand(batch), radius.expand(batch), lost))

    def _once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._kept:
            self._kept[key] = compute()
        return self._kept[key]


def box_minimum(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rigorous: bool = False
                ) -> torch.Tensor:
    """Exact minimum of lam . h over the box [lo, hi]: lam (B, S, ...) -> (B, S).
    ``rigorous``: a float lower bound of it (:func:`box_terms`)."""
    return box_minimum_of(lam, box_terms(lo, hi, rigorous))


def box_terms(lo: torch.Tensor, hi: torch.Tensor, rigorous: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The box's centre c and radius r (B, n, 1) and the underflow allowance that
    :func:`box_minimum_of` reads. ``rigorous``: c and r round, and so do both dot products
    and their difference: at most gamma_{n+3} |lam| . (|c| + r) in all, which is paid for by
    taking the radius r + gamma_{n+5} (|c| + r) (no extra product); the products' underflow
    by 2 (n + 2) eta."""
    center = ((hi + lo) / 2).flatten(1).unsqueeze(2)
    radius = ((hi - lo) / 2).flatten(1).unsqueeze(2)
    lost = 0.0
    if rigorous:
        n = center.shape[1]
        radius = radius + gamma(n + 5, lo.dtype) * (center.abs() + radius)
        lost = 2 * (n + 2) * eta(lo.dtype)
    return center, radius, lost


def box_minimum_of(lam: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor, float]
                   ) -> torch.Tensor:
    """lam . c - |lam| . r - lost (:func:`box_terms`), lam (B, S, ...) -> (B, S)."""
    flat = lam.flatten(2)
    center, radius, lost = terms
    return (flat @ center).squeeze(2) - (flat.abs() @ radius).squeeze(2) - lost


#: Input dtypes: each converts to float64 exactly (float8 types lack isfinite and min).
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    """Refuse anything that is not a non-empty batch of pixels in [0, 1] in one of
    ``INPUT_DTYPES``."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise InputError(f"expected a float16, bfloat16, float32 or float64 tensor, got dtype "
                         f"{x.dtype}")
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(f"expected input of shape (B, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch")
    if not torch.isfinite(x).all():
        raise InputError("input contains NaN or Inf")
    if x.min() < 0 or x.max() > 1:
        raise InputError(f"pixels must lie in [0, 1] (epsilon is measured there); got range "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
