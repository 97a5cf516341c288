"""Exact robustness oracles for tiny piecewise-linear networks (testing certificates).

For a network f built from Flatten, Reshape, (Lipschitz)Linear, (Lipschitz, residual) Conv2d
and AvgPool2d (as dense matrices), eval-mode BatchNorm, Normalize, ReLU, MinMax and their
clipped forms, LeakyReLU and MaxPool2d, or a graph of them with residual adds and
concatenations (its chain, :meth:`certnet.graph.Graph.chain`), all lowered exactly to affine /
ReLU / MinMax operations by :mod:`certnet.verify.lowering`, a point x, a label and a radius
eps, the oracles compute

    m* = min { min_{j != label} f(x')_label - f(x')_j :  ||x' - x|| <= eps,  lo <= x' <= hi }

(``domain=(lo, hi)``, default the pixel box [0, 1]; ``domain=None`` drops the box). The point is
robust iff m* > 0 (a tie is not robust). Every oracle also returns a concrete minimiser x', and
the value it reports is the margin of x' itself, from a float64 forward pass of the torch layers:

* it is *attained*, hence >= m*, so a reported value <= 0 is a genuine counterexample;
* it exceeds m* by at most the solver's tolerance (see each method), never by more.

Methods (their modules give the encodings and tolerances):

* ``linf``, ``method="milp"`` (default): :mod:`certnet.verify.milp`, one MILP per competing
  class (Tjeng, Xiao & Tedrake, ICLR 2019), exact up to HiGHS' tolerances.
* ``l2`` (and ``linf`` with ``method="enumerate"``): :mod:`certnet.verify.regions`, activation
  regions enumerated and the margin minimised exactly on each, up to float64 rounding; inputs
  above ``max_dim`` (default 4) dimensions are refused.
"""

from certnet.verify.oracle import (
    MAX_DIM,
    Domain,
    Method,
    Norm,
    OracleResult,
    exact_min_margin,
    find_counterexample,
    min_margin,
)

__all__ = ["MAX_DIM", "Domain", "Method", "Norm", "OracleResult", "exact_min_margin",
           "find_counterexample", "min_margin"]
