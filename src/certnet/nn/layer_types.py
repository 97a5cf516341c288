"""One registration per layer type: everything certnet knows about a module of exactly that
type, in one place (deel-torchlip's self-describing layers, registered as timm registers its
models). A new layer type is one :func:`register_layer_type` call next to its class: its JSON
spec, its l2 and l_inf Lipschitz bounds, the rounding of its float64 forward pass, its bound
rule, its masked local bound and its flags. Matching is by exact type: a subclass may change
``forward``, so it is never trusted as its parent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from certnet.registry import Registry
from certnet.schema import fields_schema


def _no_fields(m: nn.Module) -> dict[str, Any]:
    return {}


@dataclass
class LayerType:
    """What certnet knows about modules of exactly type ``cls`` (None: not known).

    ``name``, ``describe``, ``schema``: stored in checkpoints as ``{"type": name,
    **describe(m)}`` and rebuilt as ``cls(**fields)`` once the fields fit ``schema`` (field ->
    type; no other field is accepted); no ``name``: never stored.
    ``exact``: computed without rounding and 1-Lipschitz in every l_p norm (ReLU, MinMax, ...).
    ``l2_bound(m)``: a sound float64 l2 Lipschitz bound (eval mode); ``l2_estimate(m, k)``: the
    training estimate after k power-iteration steps. ``linf_bound(m)``: a sound l_inf -> l_inf
    bound, rounded up (None if unknown for this module). ``rounding(m)``: the
    :class:`certnet.nn.rounding.RoundingBound` of its float64 forward pass.
    ``rule``: its bound rule (:class:`certnet.bounds.rules.BoundRule`).
    ``masked_bound(m, rows, cols, tails)``: a sound per-point bound of ||diag(rows) A
    diag(cols)||_2 for its linear part A, or None (Huang et al. 2021, §3).
    ``reshape_only``: only reshapes (keep masks pass through it).
    ``batch_statistics``: in training mode it normalises by the batch (no single-input bound).
    ``dense``: x -> W x + b on flat inputs with W = ``m.weight`` (out, in): a Lipschitz
    certificate's head (pairwise rows), and its Gram split serves local bounds.
    ``annealed_p``: an l_p-dist layer whose p training anneals towards inf; the training
    surrogate of its l_inf bound takes it at p = inf.
    ``check(m, name)``: refuses (:class:`certnet.errors.UnsupportedLayerError`) a module whose
    state the bounds above do not cover soundly (e.g. BatchNorm statistics with no float64 form).
    ``convert(m)``: for a plain torch layer, the certnet layer computing the same function
    whose bounds are known (weights copied; None: the identity, dropped), see
    :func:`certnet.nn.lipschitz.convert_sequential`.
    """

    cls: type[nn.Module]
    name: str | None = None
    describe: Callable[[Any], dict[str, Any]] = _no_fields
    schema: dict[str, Any] | None = None
    exact: bool = False
    l2_bound: Callable[[Any], torch.Tensor] | None = None
    l2_estimate: Callable[[Any, int], torch.Tensor | float] | None = None
    linf_bound: Callable[[Any], float | None] | None = None
    rounding: Callable[[Any], Any] | None = None
    rule: Any = None
    masked_bound: Callable[..., torch.Tensor | None] | None = None
    reshape_only: bool = False
    batch_statistics: bool = False
    dense: bool = False
    annealed_p: bool = False
    check: Callable[[Any, str], None] | None = None
    convert: Callable[[Any], nn.Module | None] | None = None
    fields: type[BaseModel] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fields = fields_schema(f"{self.name or self.cls.__name__} layer", self.schema or {})


#: spec name -> layer type (the storable ones)
LAYER_TYPES: Registry[LayerType] = Registry("layer type")
#: exact module class -> layer type (every registered one)
BY_CLASS: dict[type[nn.Module], LayerType] = {}


def register_layer_type(layer_type: LayerType) -> LayerType:
    """Register ``layer_type`` for modules of exactly its class (and its spec name)."""
    BY_CLASS[layer_type.cls] = layer_type
    if layer_type.name is not None:
        LAYER_TYPES.register(layer_type.name, layer_type)
    return layer_type


def unit_bound(m: nn.Module) -> float:
    """The l_inf bound of a 1-Lipschitz layer."""
    return 1.0


def layer_type(m: nn.Module | type[nn.Module]) -> LayerType | None:
    """The registration of ``m``'s exact type (or of the class ``m``), None if unregistered."""
    return BY_CLASS.get(m if isinstance(m, type) else type(m))


def is_dense(m: nn.Module) -> bool:
    """Whether ``m``'s exact type is registered as a dense affine layer (``LayerType.dense``)."""
    known = layer_type(m)
    return known is not None and known.dense
