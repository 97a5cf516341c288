"""The device a command runs on, from its ``--device`` name."""

from __future__ import annotations

import torch

from certnet.errors import ConfigError

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything
    else, or a CUDA device this machine lacks, is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use {DEVICES}") from err
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r} (certnet's sound bounds need float64); "
                          f"use {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device {name!r}: CUDA is not available (torch "
                              f"{torch.__version__}, {build}); use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    return device
