"""The user cache: ``$CERTNET_CACHE`` or ``~/.cache/certnet``, written atomically."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    return Path(os.environ.get("CERTNET_CACHE", Path.home() / ".cache" / "certnet"))


def save(contents: dict[str, bytes | np.ndarray], target: Path) -> None:
    """Write each file atomically (bytes as they are, arrays as .npy); failures only warn."""
    tmp = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        for stem, data in contents.items():
            tmp = target / f".{stem}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                if isinstance(data, np.ndarray):
                    np.save(f, data, allow_pickle=False)
                else:
                    f.write(data)
            os.replace(tmp, target / stem)
    except (OSError, ValueError) as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache the dataset in {target}: {err}", stacklevel=3)
