"""Which convolution algorithms run: oneDNN (CPU) and cuDNN choose their own (Winograd, FFT),
whose rounding the interval bounds do not cover, and oneDNN's fixed cost per call dominates
convolutions of a single small image, such as power iteration's."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def gemm_convolutions(enabled: bool = True) -> Iterator[None]:
    """Convolutions as im2col + GEMM (oneDNN and cuDNN off) while ``enabled``: a dot product
    per output, whose rounding the standard bounds cover."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags context manager warns about TF32
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
            yield


@contextmanager
def without_onednn() -> Iterator[None]:
    """oneDNN off, cuDNN as it was: 3-5x faster single-image CPU convolutions (power
    iteration), measured; batched training convolutions are faster with oneDNN. Sets the one
    switch directly: 1 us per use, where the flags context managers (and their TF32 warning
    filter) took 14 us, twice per GloRo 2C2F training step."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous
