"""The configuration of a training run, validated when it is built (before any data is loaded).

This module does not import torch at import time, so the CLI can show the defaults in
``certnet train --help`` cheaply.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from certnet.errors import ConfigError
from certnet.schedules import Ramp

AUGMENTATIONS = ("none", "crop-flip")
PRECISIONS = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "sgd")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "a mapping",
               type(None): "null"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (YAML presets under ``certnet/configs``).

    ``eps`` is the certification radius; training uses ``eps * eps_train_factor`` scaled by
    ``eps_schedule``. ``lr_schedule`` multiplies ``lr``; ``loss_schedules`` gives extra
    keyword arguments of the method's loss (e.g. ``trades_lambda``) as schedules.
    ``method_kwargs`` and ``arch_kwargs`` are keyword arguments of the method class and of the
    architecture function. ``init`` overrides the method's initialisation (``archs.INITS``);
    ``optimizer_kwargs`` go to the optimizer (:mod:`certnet.optim`; Adam: betas, eps, amsgrad;
    SGD: momentum, dampening, nesterov);
    ``grad_clip`` clips the gradient's global l2 norm. ``precision`` runs the training
    forward and backward under autocast (``bfloat16``, or ``float16`` with loss scaling);
    certification always uses the float64 copy and bounds, whatever the training precision.
    Every ``eval_every`` epochs the model is certified on the test set (its first
    ``eval_limit`` points, if set); evaluations before the last, which only monitor the run,
    use an evenly spaced subset of about ``monitor_limit`` of those points (None or 0: all).
    """

    method: str = "gloro"
    arch: str = "2c2f"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    data_dir: str | None = None
    eps: float = 0.3
    eps_train_factor: float = 1.0
    eps_schedule: Any = 1.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: Any = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adam"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    grad_clip: float | None = None
    init: str | None = None
    loss_schedules: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    eval_every: int = 1
    eval_limit: int | None = None
    monitor_limit: int | None = 1000
    train_limit: int | None = None
    augment: str = "none"
    device: str = "auto"
    precision: str = "float32"

    def __post_init__(self) -> None:
        from certnet.archs import ARCHS, INITS  # these import torch: only once a config is built
        from certnet.methods import get_method
        from certnet.methods.base import check_eps

        check_field_types(self)
        check_eps(self.eps)
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch_size must be positive")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; choose {AUGMENTATIONS}")
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r}; choose from {sorted(ARCHS)}")
        if self.init is not None and self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose from {sorted(INITS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose {PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose {OPTIMIZERS}")
        for name in ("train_limit", "eval_limit", "monitor_limit"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must be a number of points, got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive, got {self.grad_clip!r}")
        check_kwargs("optimizer_kwargs", self.optimizer_class().__init__, self.optimizer_kwargs,
                     ("self", "params", "lr", "weight_decay"))
        check_kwargs("method_kwargs", get_method(self.method).__init__, self.method_kwargs,
                     ("self", "layers", "input_shape", "num_classes"))
        check_kwargs("arch_kwargs", ARCHS[self.arch], self.arch_kwargs,
                     ("input_shape", "num_classes"))
        self.eps_schedule = Ramp.parse(self.eps_schedule)
        self.lr_schedule = Ramp.parse(self.lr_schedule)
        self.loss_schedules = {k: Ramp.parse(v) for k, v in self.loss_schedules.items()}

    def optimizer_class(self) -> type:
        """The optimizer class ``optimizer`` names (:mod:`certnet.optim`)."""
        from certnet.optim import OPTIMIZERS as CLASSES

        return CLASSES[self.optimizer]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} not found") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eps_schedule"] = self.eps_schedule.to_dict()
        out["lr_schedule"] = self.lr_schedule.to_dict()
        out["loss_schedules"] = {k: v.to_dict() for k, v in self.loss_schedules.items()}
        return out


def _matches(value: Any, kind: Any) -> bool:
    kind = get_origin(kind) or kind
    if kind is type(None):
        return value is None
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is dict:
        return isinstance(value, Mapping)
    return isinstance(value, kind)


def check_field_types(config: Any) -> None:
    """ConfigError for a dataclass field whose value does not fit its annotation (an int where
    a float is expected is fine; a bool is never a number)."""
    for name, hint in get_type_hints(type(config)).items():
        if hint is Any:
            continue
        kinds = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        value = getattr(config, name)
        if not any(_matches(value, kind) for kind in kinds):
            expected = " or ".join(_TYPE_NAMES.get(get_origin(k) or k, str(k)) for k in kinds)
            raise ConfigError(f"{name} must be {expected}, got {value!r} "
                              f"({type(value).__name__})")


def check_kwargs(what: str, function: Callable[..., Any], kwargs: Mapping[str, Any],
                 supplied: tuple[str, ...]) -> None:
    """ConfigError naming the keys of ``kwargs`` that ``function`` does not accept (besides the
    arguments in ``supplied``, which certnet passes itself)."""
    params = inspect.signature(function).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.name not in supplied
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown}; accepted: {accepted}")
