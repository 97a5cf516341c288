"""One split of a dataset held in memory, and its checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from certnet.errors import DataError


@dataclass
class Dataset:
    """One split of a dataset held in memory: ``x`` as stored, uint8 pixels (0..255; a quarter
    of float32's memory) or float32 in [0, 1]; :meth:`images` gives float32 batches."""

    name: str
    x: torch.Tensor  # (N, C, H, W) uint8, or float32 in [0, 1]
    y: torch.Tensor  # (N,) int64
    num_classes: int
    checksum: str  # md5 of the source files, for provenance in checkpoints

    def images(self, index: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """The images ``x[index]`` as float32 in [0, 1] (uint8 pixels divided by 255, the same
        correctly rounded quotients as a float32 copy of the whole split)."""
        x = self.x[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.y)


def to_dataset(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
               checksum: str) -> Dataset:
    """uint8 images in [0, 255] (kept as uint8) or float images in [0, 1] (as float32),
    (N, C, H, W) in any memory layout."""
    if len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes})")
    if images.dtype == np.uint8:
        x = np.require(images, requirements=["C", "W"])  # torch needs writable memory
    else:
        x = images.astype(np.float32, order="C")
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{name}: float pixels must lie in [0, 1] "
                            f"(got [{x.min()}, {x.max()}])")
    return Dataset(name, torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64)),
                   num_classes, checksum)

