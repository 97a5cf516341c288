"""Any network, ready to certify and verify (issue 27's ``certnet.bounded``): an ``nn.Module``
(traced by torch.fx, or an ``nn.Sequential`` as it is) or an ONNX file becomes a
:class:`Bounded`, which every certifier whose maths applies accepts (it is
:class:`certnet.certifiers.base.Certifiable`) and which decides VNN-LIB properties. The
trained :class:`certnet.methods.base.CertifiedModel` s are the special case that knows its
training method.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certnet.certificate import Certificate
from certnet.certifiers import certify as certify_with
from certnet.decide import Verdict, decide
from certnet.errors import InputError, UnsupportedLayerError
from certnet.graph import Graph
from certnet.nn.integrity import Float64Twin, check_plain
from certnet.nn.lipschitz import convert_sequential
from certnet.properties import Property, read_vnnlib
from certnet.threat import check_norm


class Bounded:
    """A network as certifiers see it: ``layers`` (its chain, :meth:`Graph.chain`: residual
    adds and concatenations included; a chain of plain torch layers with known Lipschitz forms
    as those, :func:`_with_known_bounds`), input and output shapes, a default norm and
    certifier (``crown``: bound propagation applies to every supported network). ``graph``
    keeps the network's own structure and operators."""

    method = "bounded"
    slope = "adaptive"

    def __init__(self, graph: Graph, norm: str = "linf", certifier: str = "crown") -> None:
        self.graph = graph
        self.input_shape = graph.input_shape
        self.layers = _with_known_bounds(graph.chain(), graph.input_shape)
        with torch.no_grad():
            out = self.layers(torch.zeros(1, *self.input_shape,
                                          dtype=next(graph.parameters()).dtype))
        if out.dim() != 2 or out.shape[1] < 2:
            raise InputError(f"the network outputs shape {tuple(out.shape[1:])}; certifying "
                             "a class needs a vector of at least two scores")
        self.num_classes = out.shape[1]
        self.norm = check_norm(norm)
        self.default_certifier = certifier
        self._twins: dict[str, Float64Twin] = {}

    def float64_copy(self, key: str, derive: Callable[[nn.Sequential], Any]) -> Float64Twin:
        """As :meth:`certnet.methods.base.CertifiedModel.float64_copy`."""
        check_plain(self.layers)
        twin = self._twins.get(key)
        if twin is None or not twin.matches(self.layers):
            twin = self._twins[key] = Float64Twin(self.layers, derive)
        return twin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def certify(self, x: torch.Tensor, eps: float, certifier: str | None = None,
                norm: str | None = None) -> Certificate:
        """Sound certificates of the predicted class of each point of ``x`` (inputs in [0, 1])
        over the ``norm`` ball of radius ``eps`` (:func:`certnet.certifiers.certify`)."""
        return certify_with(self, x, eps, certifier, norm)

    def verify(self, prop: Property | str | Path, methods: tuple[str, ...] = (
            "ibp", "crown", "alpha-crown"), timeout: float | None = None) -> Verdict:
        """Decide a VNN-LIB property (a :class:`Property` or a file): :func:`certnet.decide`."""
        prop = prop if isinstance(prop, Property) else read_vnnlib(Path(prop))
        return decide(self.layers, self.input_shape, prop, methods, timeout,
                      twin=self.float64_copy("bounds", lambda layers: None))


def _with_known_bounds(chain: nn.Sequential, input_shape: tuple[int, ...]) -> nn.Sequential:
    """``chain`` with its plain Linear / Conv2d layers as certnet's Lipschitz layers computing
    the same function (weights copied, outputs checked: :func:`convert_sequential`), so the
    Lipschitz certifiers apply where their maths does; ``chain`` itself where a layer has no
    such form (a lowered graph's steps, a smooth activation): bound propagation only."""
    try:
        return convert_sequential(chain, input_shape)
    except UnsupportedLayerError:
        return chain


def bounded(model: nn.Module | str | Path, input_shape: tuple[int, ...] | None = None,
            norm: str = "linf", certifier: str = "crown") -> Bounded:
    """``model`` — an ONNX file, an ``nn.Sequential`` or any ``nn.Module`` torch.fx can trace
    (``input_shape`` required, one input without the batch dimension) — as a :class:`Bounded`.
    Unsupported operators are one error naming the node."""
    if isinstance(model, (str, Path)):
        from certnet.graph.onnx_import import load_onnx

        return Bounded(load_onnx(model), norm, certifier)
    if input_shape is None:
        raise InputError("bounded(module, input_shape): give one input's shape, without the "
                         "batch dimension")
    if isinstance(model, nn.Sequential):
        return Bounded(Graph.from_sequential(model, tuple(input_shape)), norm, certifier)
    from certnet.graph.fx_import import from_module

    return Bounded(from_module(model, tuple(input_shape)), norm, certifier)
