"""Certifiers as their own registry, apart from methods (docs/architecture.md §2).

A :class:`Certifier` says whether it applies to a model in a norm and certifies a batch; any
model can be certified by any certifier that applies to it. :func:`certify` is the one front:
the default certifier (the model's ``default_certifier``) and the default norm (the model's
training norm) are resolved here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from certnet.certificate import Certificate
from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.registry import Registry
from certnet.threat import ThreatModel, check_eps, check_inputs, check_norm


class Certifiable(Protocol):
    """What a certifier may ask of a model (every :class:`certnet.methods.base.CertifiedModel`
    is one): its network, shapes, training norm and default certifier, and float64 copies."""

    layers: nn.Sequential
    input_shape: tuple[int, ...]
    num_classes: int
    method: str
    norm: str
    default_certifier: str
    #: the ReLU lower-slope rule of bound propagation (see ``certnet.bounds.rules.SLOPES``)
    slope: str

    def float64_copy(self, key: str, derive: Any) -> Any: ...


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

    #: Whether it combines the others (``best``): never one of the ``applicable`` ones.
    combines: ClassVar[bool] = False

    def applies(self, model: Certifiable, norm: str) -> str | None:
        """None if this certifier can certify ``model`` in ``norm``, else the reason."""
        raise NotImplementedError

    def certify(self, model: Certifiable, x: torch.Tensor, threat: ThreatModel
                ) -> Certificate:
        """Sound certificate for every point of the (already validated, float64) batch ``x``."""
        raise NotImplementedError


CERTIFIERS: Registry[Certifier] = Registry("certifier")


def layers_problem(model: Certifiable, check: Callable[[nn.Sequential], Any],
                   errors: type[Exception] = UnsupportedLayerError) -> str | None:
    """``Certifier.applies`` for a certifier that needs ``model.layers`` to be an
    ``nn.Sequential`` that ``check`` accepts (raising ``errors`` otherwise)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential):
        return "it needs the model's network as an nn.Sequential in .layers"
    try:
        check(layers)
    except errors as err:
        return str(err)
    return None


def register_certifier(certifier: Certifier) -> Certifier:
    """Make ``certifier`` reachable by its name (a name registered twice warns; the later wins)."""
    return CERTIFIERS.register(certifier.name, certifier)


def applicable(model: Certifiable, norm: str) -> list[str]:
    """Names of the certifiers (other than those that combine them) that apply to ``model``
    in ``norm``, cheapest first."""
    return [c.name for c in sorted(CERTIFIERS.values(), key=lambda c: c.cost)
            if not c.combines and c.applies(model, norm) is None]


def resolve(model: Certifiable, certifier: str | None, norm: str | None
            ) -> tuple[Certifier, str]:
    """The certifier and norm to use (defaults: the model's), or a ConfigError saying why
    the certifier does not apply."""
    norm = check_norm(norm or model.norm)
    chosen = CERTIFIERS[certifier or model.default_certifier]
    reason = chosen.applies(model, norm)
    if reason is not None:
        raise ConfigError(f"certifier {chosen.name!r} does not apply to this {model.method} "
                          f"model in {norm}: {reason}; applicable: "
                          f"{applicable(model, norm) or 'none'}")
    return chosen, norm


def run(chosen: Certifier, model: Certifiable, x: torch.Tensor, threat: ThreatModel
        ) -> Certificate:
    """``chosen``'s certificate of the (validated) batch ``x``, in float64 (exact from float16,
    bfloat16 and float32: no certifier computes in the input's dtype), ``by`` filled in."""
    cert = chosen.certify(model, x.to(torch.float64), threat)
    if cert.by is None:
        cert.by = [chosen.name if c else "" for c in cert.certified.tolist()]
    return cert


def certify(model: Certifiable, x: torch.Tensor, eps: float, certifier: str | None = None,
            norm: str | None = None) -> Certificate:
    """Sound certificate of ``model`` for every point of ``x`` at radius ``eps`` in ``norm``
    (default: the model's training norm) by ``certifier`` (default: the model's)."""
    check_inputs(x, model.input_shape)
    check_eps(eps)
    chosen, norm = resolve(model, certifier, norm)
    return run(chosen, model, x, ThreatModel(norm, float(eps)))
