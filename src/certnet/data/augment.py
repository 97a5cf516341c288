"""Training-time augmentations, by name (``augment`` in a training config): a function of a
batch and the epoch's generator, so every rank draws the same."""

from __future__ import annotations

from collections.abc import Callable

import torch

from certnet.registry import Registry

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
AUGMENTATIONS.register("none", lambda x, generator: x)


@AUGMENTATIONS.decorator("crop-flip")
def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: random translation by up to ``pad`` pixels (zero fill,
    i.e. a random crop of the padded image) and a random horizontal flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(-1, x.shape[1], h, w)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(-1, x.shape[1], h, w)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(x.shape[1]).view(1, -1, 1, 1),
                 rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), out.flip(3), out)
