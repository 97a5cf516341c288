"""Which convolution algorithms run, and on how many points at once: oneDNN (CPU) and cuDNN
choose their own (Winograd, FFT), whose rounding the interval bounds do not cover, and
oneDNN's fixed cost per call dominates convolutions of a single small image, such as power
iteration's; im2col + GEMM convolutions are fastest on CPU chunks that stay in cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def gemm_convolutions(enabled: bool = True) -> Iterator[None]:
    """Convolutions as im2col + GEMM (oneDNN and cuDNN off) while ``enabled``: a dot product
    per output, whose rounding the standard bounds cover."""
    if not enabled:
        yield
        return
    # the two switches set directly (as without_onednn): the flags context managers (and the
    # TF32 warning filter they need) cost more than a small layer's whole bound
    onednn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = onednn, cudnn


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


#: im2col (or, without convolutions, activation) elements one chunk of points may hold on
#: the CPU: 16 MiB of float64, half this machine's 32 MiB last-level cache (the fastest budget
#: in all over GloRo 2C2F, 4C3F and IBP certification, benchmarks/certify_chunks.py).
GEMM_CHUNK_ELEMENTS = 2**21


def gemm_chunk(layers: nn.Sequential, x: torch.Tensor,
               outputs: list[torch.Tensor] | None = None) -> int:
    """Points per chunk for a pass of ``layers`` over ``x`` with :func:`gemm_convolutions`
    (``outputs``: every layer's output on ``x[:1]``, if the caller has them already).
    On the CPU, torch unfolds a convolution's whole batch (im2col) before its GEMMs; past the
    last-level cache that buffer makes a float64 pass memory-bound (certification of 2000
    points at once: 2.3-2.9x slower, benchmarks/certify_chunks.py). Off the CPU: every point
    at once."""
    if x.device.type != "cpu" or len(x) <= 1:
        return max(1, len(x))
    if outputs is None:
        outputs, h = [], x[:1]
        with torch.no_grad():
            for layer in layers:
                h = layer(h)
                outputs.append(h)
    widest = max(1, *(out[0].numel() for out in outputs),
                 *(layer.weight[0].numel() * out[0, 0].numel()
                   for layer, out in zip(layers, outputs, strict=True)
                   if isinstance(layer, nn.Conv2d)))
    return max(1, GEMM_CHUNK_ELEMENTS // widest)
