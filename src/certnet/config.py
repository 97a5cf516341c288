"""The configuration of a training run, validated when it is built (before any data is loaded).

This module does not import torch at import time, so the CLI can show the defaults in
``certnet train --help`` cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from certnet.errors import ConfigError
from certnet.schedules import Ramp
from certnet.schema import (
    Count,
    NonNegative,
    Positive,
    dataclass_schema,
    signature_schema,
    validate,
)

PRECISIONS = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adam", "sgd")
#: optimizer arguments certnet passes itself
OPTIMIZER_SUPPLIED = ("self", "params", "lr", "weight_decay")


@dataclass
class TrainConfig:
    """Everything that defines a training run (YAML presets under ``certnet/configs``); the
    field annotations are its schema (:mod:`certnet.schema`).

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
    eps: NonNegative = 0.3
    eps_train_factor: NonNegative = 1.0
    eps_schedule: Any = 1.0
    epochs: Positive = 10
    batch_size: Positive = 256
    lr: NonNegative = 1e-3
    lr_schedule: Any = 1.0
    weight_decay: NonNegative = 0.0
    optimizer: Literal[OPTIMIZERS] = "adam"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    init: str | None = None
    loss_schedules: dict[str, Any] = field(default_factory=dict)
    seed: Count = 0
    eval_every: Count = 1
    eval_limit: Count | None = None
    monitor_limit: Count | None = 1000
    train_limit: Count | None = None
    augment: str = "none"
    device: str = "auto"
    precision: Literal[PRECISIONS] = "float32"

    def __post_init__(self) -> None:
        from certnet.archs import ARCHS, INITS  # these import torch: only once a config is built
        from certnet.data.augment import AUGMENTATIONS
        from certnet.methods import get_method

        validate(dataclass_schema(type(self)), dataclasses.asdict(self), "")
        ARCHS[self.arch], INITS[self.init or "default"], AUGMENTATIONS[self.augment]  # known
        validate(signature_schema(self.optimizer_class().__init__, OPTIMIZER_SUPPLIED),
                 self.optimizer_kwargs, "optimizer_kwargs")
        validate(get_method(self.method).options_schema(), self.method_kwargs, "method_kwargs")
        validate(signature_schema(ARCHS[self.arch], ("input_shape", "num_classes")),
                 self.arch_kwargs, "arch_kwargs")
        self.eps_schedule = Ramp.parse(self.eps_schedule, "eps_schedule")
        self.lr_schedule = Ramp.parse(self.lr_schedule, "lr_schedule")
        self.loss_schedules = {k: Ramp.parse(v, f"loss_schedules.{k}")
                               for k, v in self.loss_schedules.items()}

    def optimizer_class(self) -> type:
        """The optimizer class ``optimizer`` names (:mod:`certnet.optim`)."""
        from certnet.optim import OPTIMIZERS as CLASSES

        return CLASSES[self.optimizer]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "") -> TrainConfig:
        """The config ``values`` describe; ConfigError (prefixed by ``where``) unless they
        fit the schema."""
        validate(dataclass_schema(cls), values, where)
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{where}{': ' if where else ''}{err}") from None

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
        return cls.from_dict(values, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "eps_schedule": self.eps_schedule.to_dict(),
                "lr_schedule": self.lr_schedule.to_dict(),
                "loss_schedules": {k: v.to_dict() for k, v in self.loss_schedules.items()}}


#: the bundled training presets (``certnet train --config NAME``, ``certnet presets``)
PRESETS = Path(__file__).parent / "configs"


def preset_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a preset under ``certnet/configs``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    preset = PRESETS / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        near = difflib.get_close_matches(name_or_path, names, 3)
        hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
        raise ConfigError(f"unknown preset {name_or_path!r}; {hint}`certnet presets` lists "
                          f"all {len(names)}, or pass a .yaml file")
    return preset
