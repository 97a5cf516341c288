"""The contract every certification method honours (docs/architecture.md §2).

A method is one file under ``certnet/methods/`` that subclasses :class:`CertifiedModel` and
registers itself with :func:`register_method`; the Trainer, the certification engine, the
checkpoint format and the CLI then serve it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from certnet.certificate import Certificate
from certnet.errors import ConfigError
from certnet.nn.integrity import Float64Twin, check_plain
from certnet.nn.lipschitz import convert_sequential, trace_shapes
from certnet.registry import Registry
from certnet.schema import signature_schema
from certnet.threat import Norm

__all__ = ["METHODS", "Certificate", "CertifiedModel", "check_num_classes", "get_method",
           "register_method"]


def check_num_classes(num_classes: Any) -> None:
    """ConfigError unless ``num_classes`` is an int >= 2 (not a bool, not a float): with one
    class every point is "certified" whatever the radius."""
    if type(num_classes) is not int or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")


class CertifiedModel(nn.Module):
    """Base class: plain logits from ``forward`` (the network is ``self.layers``, an
    ``nn.Sequential`` from inputs to logits), a robust training ``loss`` and ``certify``, a thin
    front of :func:`certnet.certifiers.certify`. Subclasses set ``method``, their training
    ``norm`` (the default threat model, not the only one), ``default_certifier`` and ``init``."""

    method: ClassVar[str] = ""
    norm: ClassVar[Norm] = "l2"
    #: Initialisation of freshly built layers (a ``certnet.archs.INITS`` name).
    init: ClassVar[str] = "orthogonal"
    #: Name of the certifier ``certify`` uses when none is given (certnet.certifiers).
    default_certifier: ClassVar[str] = "best"
    #: The ReLU lower-slope rule bound-propagation certifiers use (``certnet.bounds.SLOPES``;
    #: IBP-family methods train with theirs).
    slope: str = "adaptive"
    #: Whether a training step may leave a parameter without a gradient (DDP then searches
    #: for such parameters every step, and warns when told to search for nothing).
    skips_parameters: ClassVar[bool] = False
    #: Whether training at full eps from the first step tends to collapse (interval bounds:
    #: Gowal et al. 2018, Shi et al. 2021 ramp eps up); the Trainer warns without a ramp.
    needs_eps_ramp: ClassVar[bool] = False

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        check_num_classes(num_classes)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self._twins: dict[str, Float64Twin] = {}

    def check_logits(self, layers: nn.Sequential) -> None:
        """ConfigError unless ``layers`` maps this model's inputs to one logit per class."""
        if trace_shapes(layers, self.input_shape) != (self.num_classes,):
            raise ConfigError(f"the network must map inputs {self.input_shape} to "
                              f"{self.num_classes} logits (flatten before the dense layers)")

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, **schedule: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Robust training loss at radius ``eps`` and per-point stats, as ``(loss, stats)``:
        ``loss`` is a scalar to minimise, ``stats`` maps ``"clean"`` and ``"robust"`` to bool
        tensors of shape (B,) (correct on x; correct and certified by the training bound) that
        the Trainer averages for its logs. ``schedule`` holds scheduled loss weights (e.g.
        GloRo's ``trades_lambda``)."""
        raise NotImplementedError

    def certify(self, x: torch.Tensor, eps: float, certifier: str | None = None,
                norm: str | None = None) -> Certificate:
        """Sound certificate for every point of the batch at radius ``eps`` in ``norm`` (default:
        the training norm) by ``certifier`` (default: ``default_certifier``)."""
        from certnet.certifiers import certify

        return certify(self, x, eps, certifier, norm)

    def float64_copy(self, key: str, derive: Callable[[nn.Sequential], Any]) -> Float64Twin:
        """A float64 eval-mode copy of ``self.layers`` and ``derive(copy)`` for certifiers,
        cached under ``key`` and rebuilt whenever any weight, buffer or attribute differs from
        the copy (compared exactly on every call); hooks and patched forwards are refused."""
        check_plain(self)
        twin = self._twins.get(key)
        if twin is None or not twin.matches(self.layers):
            twin = self._twins[key] = Float64Twin(self.layers, derive)
        return twin

    def on_progress(self, progress: float) -> dict[str, Any]:
        """Called by the Trainer before every step with the training progress in [0, 1], for
        schedules a model keeps itself (e.g. the p of l_p-dist neurons); returns the values to
        log with the epoch's metrics."""
        return {}

    def after_step(self) -> None:
        """Called by the Trainer after every optimizer step: layers with a ``project_`` method
        (e.g. clipped activations keeping thresholds >= 0) project their parameters back onto
        their valid set."""
        for m in self.modules():
            if m is not self and callable(getattr(m, "project_", None)):
                m.project_()

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's ``lr_scale`` multiplies the scheduled learning
        rate for it (default: one group of every parameter)."""
        return [{"params": list(self.parameters())}]

    @classmethod
    def from_sequential(cls, model: nn.Module, input_shape: tuple[int, ...],
                        **options: Any) -> CertifiedModel:
        """Bring your own network: this method's model of a plain trained ``nn.Sequential``
        (Linear, Conv2d, ReLU, MinMax, Flatten, eval-mode dropout, ...; weights copied and the
        function checked unchanged, see :func:`certnet.nn.lipschitz.convert_sequential`). The
        classes are its output size; ``options`` are the method's (``options_schema``)."""
        shape = tuple(input_shape)
        layers = convert_sequential(model, shape)
        out = trace_shapes(layers, shape)
        if len(out) != 1:
            raise ConfigError(f"the network must end in one logit per class, not outputs of "
                              f"shape {out} (flatten before the dense layers)")
        return cls(layers, shape, out[0], **options)

    @classmethod
    def options_schema(cls, complete: bool = False) -> type[BaseModel]:
        """The schema of the constructor's options (its typed keyword arguments besides the
        layers, input shape and classes): ``method_kwargs``, and with every option required
        (``complete``) a checkpoint's ``method_config``."""
        return signature_schema(cls.__init__, ("self", "layers", "input_shape", "num_classes"),
                                complete)

    def method_config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments besides the layers (saved in config.json)."""
        return {}

    def lipschitz_report(self) -> dict[str, float]:
        """Estimate vs sound bound of the model's Lipschitz constants (for ``certnet info``)."""
        return {}

    def lipschitz_summary(self, report: dict[str, float]) -> str:
        """One line on ``lipschitz_report()`` for a person ("" where there is nothing)."""
        return ""


METHODS: Registry[type[CertifiedModel]] = Registry("method")


def register_method(cls: type[CertifiedModel]) -> type[CertifiedModel]:
    """Class decorator: make a method reachable by name from configs and the CLI (another
    class registered under the same name warns; the later one wins)."""
    if METHODS.get(cls.method) is not cls:
        METHODS.register(cls.method, cls)
    return cls


def get_method(name: str) -> type[CertifiedModel]:
    """The method class registered as ``name`` (ConfigError naming the choices)."""
    return METHODS[name]

