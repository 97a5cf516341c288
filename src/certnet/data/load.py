"""The dataset registry and :func:`load_dataset`; torch loads only with the first dataset, so
listing the names (CLI help) needs no torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from certnet.errors import ConfigError, DataError
from certnet.registry import Registry

if TYPE_CHECKING:
    from certnet.data.dataset import Dataset

SPLITS = ("train", "test")
#: What a loader returns: (N, C, H, W) images (uint8, or float in [0, 1]), labels, the number
#: of classes and the checksum of the source files.
Split = tuple[np.ndarray, np.ndarray, int, str]
#: name -> loader(data_dir or None, split); one module of :mod:`certnet.data.datasets` each.
DATASETS: Registry[Callable[[Path | None, str], Split]] = Registry("dataset")


def load_dataset(name: str, split: str = "train", data_dir: str | Path | None = None) -> Dataset:
    """Load one split ("train" or "test") of a dataset, fetching and verifying it if needed."""
    loader = DATASETS[name]
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {SPLITS}")
    directory = Path(data_dir).expanduser() if data_dir is not None else None
    if directory is not None and not directory.is_dir():
        raise DataError(f"--data-dir {directory} does not exist or is not a directory")
    from certnet.data.dataset import to_dataset

    return to_dataset(name, *loader(directory, split))
