"""Datasets as in-memory tensors, pixels in [0, 1]: :func:`load_dataset` (name, split) with
the names in :data:`DATASETS` (one module of :mod:`certnet.data.datasets` each).

Sources are tried in order and every file is checked against its md5 before use:
``--data-dir`` (a plain directory of the original files), the user cache
(``$CERTNET_CACHE`` or ``~/.cache/certnet``), then network sources that fail fast offline
(:mod:`certnet.data.fetch`). Each dataset's module names its sources. ``Dataset`` (and torch)
is imported on first use, so listing the names needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from certnet.data import datasets  # noqa: F401  (registers the built-in datasets)
from certnet.data.cache import cache_dir
from certnet.data.load import DATASETS, SPLITS, load_dataset

if TYPE_CHECKING:
    from certnet.data.dataset import Dataset

__all__ = ["DATASETS", "SPLITS", "Dataset", "cache_dir", "load_dataset"]


def __getattr__(name: str) -> Any:
    if name != "Dataset":
        raise AttributeError(f"module 'certnet.data' has no attribute {name!r}")
    from certnet.data.dataset import Dataset

    return Dataset
