"""Schedules for epsilon, learning rate and loss weights, as functions of training progress.

A :class:`Ramp` holds ``start`` until progress ``begin``, moves to ``end`` by ``finish`` along
``shape`` and holds ``end`` after. Progress is (epoch + step / steps) / epochs in [0, 1].
Shapes: ``linear``; ``log`` (GloRo's log ramp, v = log(e^a + (e^b - e^a) t)); ``exp``
(geometric, GloRo's "decay_to"); ``cosine``; ``smooth`` (the "smoothed" eps ramp of CROWN-IBP /
Shi et al. 2021: polynomial t^4 growth over the first quarter, then linear, joined with a
continuous slope); ``constant``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from certnet.errors import ConfigError
from certnet.schema import Fraction, dataclass_schema, validate

SHAPES = ("constant", "linear", "log", "exp", "cosine", "smooth")
#: The smooth ramp's polynomial phase: exponent and the fraction of the ramp it lasts.
SMOOTH_POWER, SMOOTH_PHASE = 4, 0.25


#: the log shape takes exp of its ends: beyond this they overflow a float64
LOG_LIMIT = 700.0


@dataclass(frozen=True)
class Ramp:
    """The field annotations are the schema of a schedule in a config."""

    start: float = 1.0
    end: float = 1.0
    begin: Fraction = 0.0
    finish: Fraction = 1.0
    shape: Literal[SHAPES] = "constant"

    def __post_init__(self) -> None:
        validate(dataclass_schema(Ramp), asdict(self), "schedule")
        if self.begin > self.finish:
            raise ConfigError(f"schedule needs 0 <= begin <= finish <= 1, got {self}")
        if self.shape == "exp" and (self.start <= 0 or self.end <= 0):
            raise ConfigError("an exp schedule needs positive start and end")
        if self.shape == "log" and max(abs(self.start), abs(self.end)) > LOG_LIMIT:
            raise ConfigError(f"a log schedule needs |start|, |end| <= {LOG_LIMIT:g}")

    @classmethod
    def parse(cls, value: Any, where: str = "schedule") -> Ramp:
        """A number (constant), a dict of fields, or a Ramp; ConfigError naming ``where``."""
        if isinstance(value, Ramp):
            return value
        if type(value) in (int, float):
            value = {"start": value, "end": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: cannot read a schedule from {value!r}")
        validate(dataclass_schema(cls), value, where)
        try:
            return cls(**value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __call__(self, progress: float) -> float:
        if self.shape == "constant" or progress <= self.begin:
            return self.start
        if progress >= self.finish:
            return self.end
        t = (progress - self.begin) / (self.finish - self.begin)
        a, b = self.start, self.end
        if self.shape == "linear":
            return a + (b - a) * t
        if self.shape == "log":
            return math.log(math.exp(a) + (math.exp(b) - math.exp(a)) * t)
        if self.shape == "exp":
            return a * (b / a) ** t
        if self.shape == "smooth":
            return a + (b - a) * smooth_ramp(t)
        return b + (a - b) * (1 + math.cos(math.pi * t)) / 2


def smooth_ramp(t: float) -> float:
    """0 -> 1 on [0, 1]: c (t / m)^k for t <= m, then the line to (1, 1); c = m / (k (1 - m) + m)
    makes value and slope continuous at m (m = SMOOTH_PHASE, k = SMOOTH_POWER)."""
    k, m = SMOOTH_POWER, SMOOTH_PHASE
    c = m / (k * (1 - m) + m)
    if t <= m:
        return c * (t / m) ** k
    return c + (1 - c) * (t - m) / (1 - m)
