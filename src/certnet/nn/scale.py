"""Elementwise arithmetic with constant tensors (issue 27): ``x * c``, ``c * x``, ``x / c``,
``x + c``, ``x - c`` and ``c - x``, with ``c`` a number or any constant tensor that broadcasts
over one point (ONNX ``Mul``, ``Div``, ``Add``, ``Sub`` with a constant operand; torch.fx's
arithmetic with a number, buffer or parameter). One module, :class:`Scale`, computes

    z = x * w + b     or, with ``divide``,     z = x / w + b

in floating point exactly like that (one product or quotient, then one sum), so a division is
never replaced by a product with a rounded reciprocal: the imported module computes what the
original model does, bit for bit. Its bound rule is :mod:`certnet.bounds.rules.scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.floats import eta, unit_roundoff
from certnet.nn.layer_types import LayerType, register_layer_type
from certnet.nn.rounding import RoundingBound

#: the multiple of u charged for one product or quotient, |fl(x a') - x a| <= 11u |x a| + eta
#: (u for a product or a true division; torch's CUDA division by a CPU scalar multiplies by
#: the rounded reciprocal: (2u + u^2) |x / w| plus |x| eta, below 8u |x / w| where 1 / w is
#: subnormal), with room for the evaluation of the bounds built from it
ROUNDINGS = 16


def _constant(value: torch.Tensor | float | None, what: str) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value).detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    values = t.detach().to("cpu", torch.float64) if t.device.type != "meta" else None
    if values is not None and not bool(torch.isfinite(values).all()):
        raise InputError(f"Scale: the {what} has NaN or infinite entries")
    return t


class Scale(nn.Module):
    """z = x * weight + bias (``divide``: z = x / weight + bias), elementwise; ``weight`` and
    ``bias`` (either may be None) are constant tensors broadcast over each point, never over
    the batch and never enlarging it (checked on every input)."""

    def __init__(self, weight: torch.Tensor | float | None = None,
                 bias: torch.Tensor | float | None = None, divide: bool = False) -> None:
        super().__init__()
        w, b = _constant(weight, "weight"), _constant(bias, "bias")
        if divide and (w is None or (w.device.type != "meta" and bool((w == 0).any()))):
            raise InputError("Scale: a divisor must be given and have no zero entry")
        self.register_buffer("weight", w)
        self.register_buffer("bias", b)
        self.divide = bool(divide)

    def operands(self, like: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias) after checking that they broadcast over ``like`` (B, ...) elementwise:
        the result has ``like``'s shape, and no constant has a batch axis of its own."""
        for t in (self.weight, self.bias):
            if t is None:
                continue
            if t.dim() > like.dim() or (t.dim() == like.dim() and t.shape[0] != 1) or \
                    any(a not in (1, b) for a, b in zip(reversed(t.shape), reversed(like.shape),
                                                        strict=False)):
                raise InputError(f"Scale: a constant of shape {tuple(t.shape)} does not "
                                 f"broadcast over inputs of shape {tuple(like.shape)} "
                                 "elementwise (it may not add or enlarge axes, nor vary over "
                                 "the batch)")
        return self.weight, self.bias

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """x * weight, or x / weight (``divide``): the first of the two operations."""
        if self.weight is None:
            return x
        return x / self.weight if self.divide else x * self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, bias = self.operands(x)
        y = self.scaled(x)
        return y if bias is None else y + bias

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """|a| (the weight's shape, or a scalar 1) in ``dtype`` for the exact map z = a x + b,
        a = weight or 1 / weight: exact, or for a reciprocal rounded up (the correctly rounded
        1 / |w| is within half an ulp, subnormal or not: one ulp up covers it)."""
        if self.weight is None:
            device = self.bias.device if self.bias is not None else None
            return torch.ones((), dtype=dtype, device=device)
        weight = self.weight.detach().to(dtype)
        if not self.divide:
            return weight.abs()
        inverse = 1 / weight.abs()
        return torch.nextafter(inverse, torch.full_like(inverse, torch.inf))

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        bias = None if self.bias is None else tuple(self.bias.shape)
        return f"{'divisor' if self.divide else 'weight'}={shape}, bias={bias}"


def check_scale(m: Scale, where: str) -> None:
    """UnsupportedLayerError (naming the layer as ``where``) unless its constants are finite
    and a divisor has no zero entry (they may have been loaded after construction)."""
    for name, t in (("weight", m.weight), ("bias", m.bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise UnsupportedLayerError(f"{where}: its {name} has NaN or infinite entries")
    if m.divide and (m.weight is None or bool((m.weight == 0).any())):
        raise UnsupportedLayerError(f"{where}: a divisor with a zero entry")


def _largest_factor(m: Scale) -> torch.Tensor:
    """max |a| in float64, rounded up (:meth:`Scale.factor`): the l2 and l_inf Lipschitz
    constant of the diagonal map."""
    return m.factor(torch.float64).max()


def _rounding(m: Scale) -> RoundingBound:
    """Per entry, |fl(fl(x a) + b) - (x a + b)| <= u |z| + 11u |a| |x| + eta (the sum: u of
    its rounded value z, whatever the signs, exact where subnormal; the product or quotient:
    see ``ROUNDINGS``): in l2, below 2u ||z|| + 16u max|a| ||x|| + 2 eta per entry."""
    u = unit_roundoff(torch.float64)
    return RoundingBound(input=ROUNDINGS * u * _largest_factor(m), output=2 * u,
                         per_entry=2 * eta())


register_layer_type(LayerType(
    Scale, l2_bound=_largest_factor, l2_estimate=lambda m, k: _largest_factor(m),
    linf_bound=lambda m: float(_largest_factor(m)), rounding=_rounding, check=check_scale))

__all__ = ["ROUNDINGS", "Scale", "check_scale"]
