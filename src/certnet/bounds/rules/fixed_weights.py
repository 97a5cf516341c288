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
def fixed_weights(store: dict | None = None) -> Iterator[None]:
    """Within it :func:`once` keeps what it computes (an enclosing one keeps it longer).
    ``store`` (optional): the caller's own dict to keep it in, so a later scope over the same
    modules starts from it: only for modules whose weights never change while the store lives
    (a :class:`certnet.nn.integrity.Float64Twin`'s private copy)."""
    if _MEMO.get() is not None:
        yield
        return
    token = _MEMO.set({} if store is None else store)
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
