"""The contract every certification method honours (docs/architecture.md §2).

A method is one file under ``certnet/methods/`` that subclasses :class:`CertifiedModel` and
registers itself with :func:`register_method`; the Trainer, the certification engine, the
checkpoint format and the CLI then serve it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from certnet.errors import ConfigError, InputError

Norm = Literal["l2", "linf"]


@dataclass
class Certificate:
    """Per-point outcome of a certifier on one batch.

    ``certified[i]`` is True only if no x' with ||x' - x_i|| <= eps changes ``pred[i]``;
    ``radius[i]`` is a radius this certifier proves (0 where none), rounded down:
    ``certified[i]`` is ``radius[i] > eps`` for certifiers that compute radii.
    """

    pred: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor


class CertifiedModel(nn.Module):
    """Base class: plain logits from ``forward``, a robust training ``loss`` and a sound
    ``certify``. Subclasses set ``method`` and ``norm`` and list their certifiers."""

    method: ClassVar[str] = ""
    norm: ClassVar[Norm] = "l2"
    #: certifier name -> method name on the class; the first one is the default.
    certifiers: ClassVar[dict[str, str]] = {}

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, **schedule: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Robust training loss at radius ``eps`` and per-point stats, as ``(loss, stats)``:
        ``loss`` is a scalar to minimise, ``stats`` maps ``"clean"`` and ``"robust"`` to bool
        tensors of shape (B,) (correct on x; correct and certified by the training bound) that
        the Trainer averages for its logs. ``schedule`` holds scheduled loss weights (e.g.
        GloRo's ``trades_lambda``)."""
        raise NotImplementedError

    def certify(self, x: torch.Tensor, eps: float, certifier: str | None = None) -> Certificate:
        """Sound certificate for every point of the batch at radius ``eps``."""
        name = certifier or next(iter(self.certifiers))
        if name not in self.certifiers:
            raise ConfigError(f"unknown certifier {name!r} for method {self.method}; "
                              f"choose from {sorted(self.certifiers)}")
        check_inputs(x, self.input_shape)
        check_eps(eps)
        return getattr(self, self.certifiers[name])(x, eps)

    def method_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments besides the layers (saved in config.json)."""
        return {}

    def lipschitz_report(self) -> dict[str, float]:
        """Estimate vs sound bound of the model's Lipschitz constants (for ``certnet info``)."""
        return {}


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0) or \
            eps == float("inf"):
        raise InputError(f"epsilon must be a finite number >= 0, got {eps!r}")


def check_inputs(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    """Refuse anything that is not a non-empty float batch of pixels in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point tensor, got dtype {x.dtype}")
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


METHODS: dict[str, type[CertifiedModel]] = {}


def register_method(cls: type[CertifiedModel]) -> type[CertifiedModel]:
    """Class decorator: make a method reachable by name from configs and the CLI."""
    METHODS[cls.method] = cls
    return cls


def get_method(name: str) -> type[CertifiedModel]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]

