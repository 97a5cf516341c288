"""A certificate is about the function a module's *type* computes with its current weights.

:func:`check_plain` refuses what changes that function behind the type's back (forward hooks,
a patched ``forward``); :class:`Float64Twin` keeps a float64 copy of a network, with whatever
was derived from it (sound bounds), and tells when the network has changed since, by
comparing every weight and attribute instead of trusting the caller.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from certnet.errors import UnsupportedLayerError
from certnet.nn.layer_types import layer_type
from certnet.nn.lipschitz import ESTIMATE_ONLY_BUFFERS

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


def check_plain(model: nn.Module) -> None:
    """Refuse modules whose forward is not their type's: forward hooks or pre-hooks (on any
    submodule, or registered globally) and instance-level ``forward`` overrides."""
    if any(getattr(module_globals, name, None) for name in _GLOBAL_HOOKS):
        raise UnsupportedLayerError("global forward hooks are registered "
                                    "(torch.nn.modules.module.register_module_forward_*hook); "
                                    "they change every layer's function: remove them")
    for name, m in model.named_modules():
        if any(getattr(m, hooks, None) for hooks in _HOOKS):
            raise UnsupportedLayerError(
                f"layer {name or type(m).__name__} ({type(m).__name__}) has forward hooks, "
                "which change its function but not its bound (e.g. the hook-based weight_norm "
                "or spectral_norm): remove them")
        if "forward" in vars(m):
            raise UnsupportedLayerError(
                f"layer {name or type(m).__name__} ({type(m).__name__}) has a patched forward")


def check_certifiable(layers: nn.Module) -> None:
    """Refuse (:class:`UnsupportedLayerError`) what no certifier bounds soundly: every module
    whose layer type has a ``check`` (e.g. BatchNorm statistics without a sound float64 affine
    map, a Lipschitz convolution made non-square after construction) runs it."""
    for name, m in layers.named_modules():
        known = layer_type(m)
        if known is not None and known.check is not None:
            known.check(m, name)


def _attributes(m: nn.Module) -> dict[str, Any]:
    """Plain (non-tensor, non-private) attributes: stride, padding, alpha, input shape..."""
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters(recurse=False)),
            **{k: v for k, v in m.named_buffers(recurse=False)
               if k not in ESTIMATE_ONLY_BUFFERS}}


class Float64Twin:
    """A float64 deep copy of ``layers`` in eval mode (certificates are about the network at
    inference: BatchNorm with its running statistics) and ``derive(copy)``, valid while
    ``layers`` still has the same types, attributes and weights (compared exactly, on every
    use; the train/eval mode is not compared). The copy is checked (:func:`check_certifiable`)
    before anything is derived from it."""

    def __init__(self, layers: nn.Sequential, derive: Callable[[nn.Sequential], Any]) -> None:
        # contiguous whatever the training layout (channels_last certifies ~8% slower)
        self.layers = copy.deepcopy(layers).to(
            torch.float64, memory_format=torch.contiguous_format).eval()
        check_certifiable(self.layers)
        self.derived = derive(self.layers)
        #: the copy's weight quantities (|W|, ...) its bound walks keep across calls
        #: (``fixed_weights(twin.weight_memo)``): the copy's weights never change
        self.weight_memo: dict = {}

    def matches(self, layers: nn.Sequential) -> bool:
        mine_all, theirs_all = list(self.layers.modules()), list(layers.modules())
        if len(mine_all) != len(theirs_all):
            return False
        for mine, theirs in zip(mine_all, theirs_all, strict=True):
            if type(mine) is not type(theirs) or _attributes(mine) != _attributes(theirs):
                return False
            a, b = _tensors(mine), _tensors(theirs)
            if a.keys() != b.keys() or any(
                    b[k].shape != a[k].shape or b[k].device != a[k].device or
                    not torch.equal(b[k].to(a[k].dtype), a[k]) for k in a):
                return False
        return True
