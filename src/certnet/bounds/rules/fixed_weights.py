"""Quantities of a layer's weights that every step of one bound computation reads again (|W|,
|W| 1 for the intervals and the rounding charges): inside :func:`fixed_weights` (one walk, in
which no weight changes) each is computed once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

_MEMO: ContextVar[dict | None] = ContextVar("certnet_fixed_weights", default=None)


@contextmanager
def fixed_weights() -> Iterator[None]:
    """Within it :func:`once` keeps what it computes (an enclosing one keeps it longer)."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def once(m: nn.Module, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()``, the quantity ``name`` of ``m``'s weights, kept inside
    :func:`fixed_weights`; recomputed outside it and wherever autograd records it (a training
    step's graph is used once)."""
    memo = _MEMO.get()
    if memo is None:
        return compute()
    key = (id(m), name)
    if key not in memo:
        value = compute()
        if value.requires_grad:
            return value
        memo[key] = (m, value)  # m held: its id cannot be reused while the memo lives
    return memo[key][1]
