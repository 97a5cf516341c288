"""The oracle API: :func:`min_margin` and its two shortcuts; see :mod:`certnet.verify`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from certnet.errors import ConfigError, InputError, UnsupportedLayerError
from certnet.verify.lowering import network_ops
from certnet.verify.milp import milp_linf
from certnet.verify.regions import enumerate_regions

Norm = Literal["l2", "linf"]
Method = Literal["milp", "enumerate"]
Domain = tuple[float, float] | None

#: Inputs of higher dimension are refused by the enumeration oracle (its cost is C(m, d)).
MAX_DIM = 4


@dataclass
class OracleResult:
    """Outcome of an oracle call.

    ``margin``: min_{j != label} f(point)_label - f(point)_j in float64 (>= the exact minimum,
    equal to it up to the solver tolerance); ``bound``: the solver's optimum (the exact minimum
    up to the same tolerance, possibly slightly below it); ``point``: the minimiser x' (shape of
    x, float64, inside the ball and the domain); ``runner_up``: the class j attaining ``margin``.
    """

    margin: float
    bound: float
    point: torch.Tensor
    runner_up: int

    @property
    def robust(self) -> bool:
        return self.margin > 0


def _margins(layers: nn.Module, points: torch.Tensor, label: int) -> torch.Tensor:
    """f_label - f_j for every j (inf at j = label), float64 forward pass of the torch layers."""
    params = {k: v.detach().double() if v.is_floating_point() else v
              for k, v in [*layers.named_parameters(), *layers.named_buffers()]}
    logits = functional_call(layers, params, (points.double(),))
    margins = logits[:, label : label + 1] - logits
    margins[:, label] = float("inf")
    return margins


def _project(points: np.ndarray, x0: np.ndarray, eps: float, norm: Norm, domain: Domain
             ) -> np.ndarray:
    """Move (numerically) near-feasible points into ball ∩ domain."""
    if norm == "linf":
        points = np.clip(points, x0 - eps, x0 + eps)
    else:
        dist = np.linalg.norm(points - x0, axis=-1, keepdims=True)
        scale = np.where(dist > eps, eps / np.maximum(dist, 1e-300), 1.0)
        points = x0 + (points - x0) * scale
    if domain is not None:  # projection onto a box containing x0 never leaves the l2 ball
        points = np.clip(points, domain[0], domain[1])
    return points


def min_margin(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float, norm: Norm,
               domain: Domain = (0.0, 1.0), method: Method | None = None,
               max_dim: int = MAX_DIM) -> OracleResult:
    """Exact minimum margin of ``label`` over the ``norm`` ball of radius ``eps`` around one
    point ``x`` (no batch dimension) intersected with ``domain``; see :mod:`certnet.verify` for
    the methods and their tolerances (MILP: Tjeng, Xiao & Tedrake, ICLR 2019). Raises
    :class:`UnsupportedLayerError` for layers without an exact lowering
    (:mod:`certnet.verify.lowering`: affine layers, ReLU, MinMax, their clipped forms,
    LeakyReLU, MaxPool2d, and a graph's chain of steps with residual adds and
    concatenations), and :class:`InputError` for an enumeration problem above ``max_dim``
    input dimensions."""
    if norm not in ("l2", "linf"):
        raise ConfigError(f"verify: norm must be 'l2' or 'linf', got {norm!r}")
    method = method or ("milp" if norm == "linf" else "enumerate")
    if method not in ("milp", "enumerate") or (norm == "l2" and method == "milp"):
        raise ConfigError(f"verify: method {method!r} is not available for norm {norm!r}")
    if not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise InputError(f"verify: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(x, torch.Tensor) or not torch.isfinite(x).all():
        raise InputError("verify: x must be a finite tensor (one point, no batch dimension)")
    x0 = x.detach().to(torch.float64).cpu().numpy().reshape(-1)
    if domain is not None and (x0.min() < domain[0] or x0.max() > domain[1]):
        raise InputError(f"verify: x lies outside the domain {domain}")
    d = x0.size
    ops, out_shape = network_ops(layers, tuple(x.shape))
    if len(out_shape) != 1:
        raise UnsupportedLayerError(f"verify: the network must output a vector, not {out_shape}")
    classes = out_shape[0]
    if not 0 <= label < classes or classes < 2:
        raise InputError(f"verify: label {label} out of range for {classes} classes")
    eps = float(eps)

    lo, hi = x0 - eps, x0 + eps  # the l_inf box ∩ domain
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    if method == "milp":
        bound, candidates = milp_linf(ops, lo, hi, label)
    else:
        if d > max_dim:
            raise InputError(f"verify: exact enumeration supports inputs of at most {max_dim} "
                             f"dimensions (got {d}); raise max_dim at your own risk")
        # l_inf: the box as a polytope, in a ball around it that cuts nothing; l2: the domain
        box = (lo, hi) if norm == "linf" else None if domain is None else \
            (np.full(d, domain[0]), np.full(d, domain[1]))
        a0 = np.zeros((0, d)) if box is None else np.concatenate([np.eye(d), -np.eye(d)])
        b0 = np.zeros(0) if box is None else np.concatenate([box[1], -box[0]])
        radius = 2 * eps * np.sqrt(d) + 1.0 if norm == "linf" else eps
        bound, candidates = enumerate_regions(ops, x0, radius, a0, b0, label)
        if not candidates:
            raise RuntimeError("verify: region enumeration found no feasible point")
    pts = _project(np.stack(candidates), x0, eps, norm, domain)
    margins = _margins(layers, torch.from_numpy(pts).reshape(-1, *x.shape), label)
    per_point, runner_up = margins.min(1)
    i = int(per_point.argmin())
    return OracleResult(margin=float(per_point[i]), bound=float(bound),
                        point=torch.from_numpy(pts[i]).reshape(x.shape),
                        runner_up=int(runner_up[i]))


def exact_min_margin(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float,
                     norm: Norm, domain: Domain = (0.0, 1.0), method: Method | None = None,
                     max_dim: int = MAX_DIM) -> float:
    """min over ||x' - x|| <= eps (∩ domain) of min_{j != label} f(x')_label - f(x')_j.

    The value is the float64 margin of a concrete minimiser, so it is <= 0 only for a genuine
    counterexample; robust iff > 0. See :func:`min_margin`."""
    return min_margin(layers, x, label, eps, norm, domain, method, max_dim).margin


def find_counterexample(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float,
                        norm: Norm, domain: Domain = (0.0, 1.0), method: Method | None = None,
                        max_dim: int = MAX_DIM) -> torch.Tensor | None:
    """A point x' in the ball (∩ domain) where some class j != label scores >= ``label``
    (checked by a float64 forward pass; float64, rounding it to float32 may undo the flip), or
    None if the oracle proves there is none."""
    result = min_margin(layers, x, label, eps, norm, domain, method, max_dim)
    if result.margin > 0:
        return None
    margins = _margins(layers, result.point.reshape(1, *x.shape).double(), label)
    assert float(margins.min()) <= 0, "oracle minimiser does not reproduce in float64"
    return result.point
