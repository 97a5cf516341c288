"""Certifiers as their own registry, apart from methods (docs/architecture.md §2).

A :class:`Certifier` says whether it applies to a model in a norm and certifies a batch; any
model can be certified by any certifier that applies to it. :func:`certify` is the one front:
the default certifier (the model's ``default_certifier``) and the default norm (the model's
training norm) are resolved here and nowhere else.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from certnet.errors import ConfigError, InputError
from certnet.floats import round_down
from certnet.threat import ThreatModel, check_eps, check_norm

if TYPE_CHECKING:
    from certnet.methods.base import CertifiedModel


@dataclass
class Certificate:
    """Per-point outcome of a certifier on one batch.

    ``certified[i]`` is True only if no x' in the threat model's ball around x_i changes
    ``pred[i]``. ``radius[i]`` is a radius the certifier proves (robust on the open ball of that
    radius; 0 where none), rounded down. Certifiers with ``gives_radius`` compute it
    (``certified == radius > eps``); the others prove "eps or nothing" and report ``radius = eps``
    where certified. ``margin`` is a lower bound on min_j z_pred - z_j over the ball (bound
    propagation), ``by`` names per point the certifier that proved it ("" where none).
    """

    pred: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor
    gives_radius: bool = True
    margin: torch.Tensor | None = None
    by: list[str] | None = None

    @classmethod
    def eps_or_nothing(cls, pred: torch.Tensor, margin: torch.Tensor, eps: float
                       ) -> Certificate:
        """The certificate of a margin lower bound over the eps-ball: certified where it is
        > 0, with radius eps (rounded down to float32: never more than proved) there and 0
        elsewhere."""
        certified = margin > 0
        proved = round_down(torch.tensor(float(eps), dtype=torch.float64)).to(certified.device)
        radius = torch.where(certified, proved, torch.zeros_like(proved))
        return cls(pred=pred, certified=certified, radius=radius, gives_radius=False,
                   margin=margin)


class Certifier:
    """Interface of a certifier: ``applies`` (None, or why not) and ``certify``."""

    name: ClassVar[str] = ""
    #: Whether ``certify`` computes a radius per point (else "eps or nothing").
    gives_radius: ClassVar[bool] = True
    #: Relative cost; ``best`` tries the cheaper certifiers first.
    cost: ClassVar[int] = 0
    #: Certifiers whose every certified point this one certifies too, from the same work and
    #: more: ``best`` skips them where this one applies.
    subsumes: ClassVar[tuple[str, ...]] = ()

    def applies(self, model: CertifiedModel, norm: str) -> str | None:
        """None if this certifier can certify ``model`` in ``norm``, else the reason."""
        raise NotImplementedError

    def certify(self, model: CertifiedModel, x: torch.Tensor, threat: ThreatModel
                ) -> Certificate:
        """Sound certificate for every point of the (already validated, float64) batch ``x``."""
        raise NotImplementedError


CERTIFIERS: dict[str, Certifier] = {}


def register_certifier(certifier: Certifier) -> Certifier:
    """Make ``certifier`` reachable by its name (a name registered twice warns; the later wins)."""
    if certifier.name in CERTIFIERS:
        warnings.warn(f"certifier {certifier.name!r} registered twice; the later one wins",
                      stacklevel=2)
    CERTIFIERS[certifier.name] = certifier
    return certifier


def get_certifier(name: str) -> Certifier:
    if name not in CERTIFIERS:
        raise ConfigError(f"unknown certifier {name!r}; choose from {sorted(CERTIFIERS)}")
    return CERTIFIERS[name]


def applicable(model: CertifiedModel, norm: str) -> list[str]:
    """Names of the certifiers (other than ``best``) that apply to ``model`` in ``norm``,
    cheapest first."""
    return [c.name for c in sorted(CERTIFIERS.values(), key=lambda c: c.cost)
            if c.name != "best" and c.applies(model, norm) is None]


def resolve(model: CertifiedModel, certifier: str | None, norm: str | None
            ) -> tuple[Certifier, str]:
    """The certifier and norm to use (defaults: the model's), or a ConfigError saying why
    the certifier does not apply."""
    norm = check_norm(norm or model.norm)
    chosen = get_certifier(certifier or model.default_certifier)
    reason = chosen.applies(model, norm)
    if reason is not None:
        raise ConfigError(f"certifier {chosen.name!r} does not apply to this {model.method} "
                          f"model in {norm}: {reason}; applicable: "
                          f"{applicable(model, norm) or 'none'}")
    return chosen, norm


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


def certify(model: CertifiedModel, x: torch.Tensor, eps: float, certifier: str | None = None,
            norm: str | None = None) -> Certificate:
    """Sound certificate of ``model`` for every point of ``x`` at radius ``eps`` in ``norm``
    (default: the model's training norm) by ``certifier`` (default: the model's)."""
    check_inputs(x, model.input_shape)
    check_eps(eps)
    chosen, norm = resolve(model, certifier, norm)
    # exact from float16, bfloat16 and float32: no certifier computes in the input's dtype
    x = x.to(torch.float64)
    cert = chosen.certify(model, x, ThreatModel(norm, float(eps)))
    if cert.by is None:
        cert.by = [chosen.name if c else "" for c in cert.certified.tolist()]
    return cert
