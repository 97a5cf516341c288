"""What a certifier proves about one batch: the :class:`Certificate` every certifier returns and
every method, report and attack audit reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certnet.floats import round_down


@dataclass
class Certificate:
    """Per-point outcome of a certifier on one batch.

    ``certified[i]`` is True only if no x' in the threat model's ball around x_i changes
    ``pred[i]``. ``radius[i]`` is a radius the certifier proves (robust on the open ball of that
    radius; 0 where none), rounded down. Certifiers with ``gives_radius`` compute it
    (``certified == radius > eps``); the others prove "eps or nothing" and report ``radius = eps``
    where certified. ``margin`` is a lower bound on min_j z_pred - z_j over the ball (bound
    propagation), ``by`` names per point the certifier that proved it ("" where none).
    """

    pred: torch.Tensor
    certified: torch.Tensor
    radius: torch.Tensor
    gives_radius: bool = True
    margin: torch.Tensor | None = None
    by: list[str] | None = None

    @classmethod
    def eps_or_nothing(cls, pred: torch.Tensor, margin: torch.Tensor, eps: float
                       ) -> Certificate:
        """The certificate of a margin lower bound over the eps-ball: certified where it is
        > 0, with radius eps (rounded down to float32: never more than proved) there and 0
        elsewhere."""
        certified = margin > 0
        proved = round_down(torch.tensor(float(eps), dtype=torch.float64)).to(certified.device)
        radius = torch.where(certified, proved, torch.zeros_like(proved))
        return cls(pred=pred, certified=certified, radius=radius, gives_radius=False,
                   margin=margin)
