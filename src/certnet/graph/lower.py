"""A graph as a chain the bounds engine walks: the values still needed (the live values, or
slots) travel together as one flat state, and each graph node becomes one :class:`Step` that
applies its operator to some slots and keeps the others (a residual block: the state holds
the block's input beside the branch until the add). Every tensor is a view of the state, so
the chain computes the graph's function exactly, and the existing rules bound each operator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.graph.graph import INPUT, Graph


class Step(nn.Module):
    """One graph node on the chain: the state (B, *) is the concatenation of the flattened
    slots of ``shapes``; the step applies ``op`` to the slots ``inputs`` and returns the
    slots ``keep`` followed by the result, flattened (``last``: the result as it is), of
    one point's shape ``out_shape``."""

    def __init__(self, op: nn.Module, shapes: list[tuple[int, ...]], inputs: tuple[int, ...],
                 keep: tuple[int, ...], last: bool, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.op = op
        self.out_shape = tuple(out_shape)
        self.shapes = [tuple(s) for s in shapes]
        self.inputs = tuple(inputs)
        self.keep = tuple(keep)
        self.last = last
        self.sizes = [math.prod(s) for s in self.shapes]

    def slots(self, state: torch.Tensor) -> list[torch.Tensor]:
        """The slots of a state (B, ...) as (B, *shape) views."""
        parts = state.flatten(1).split(self.sizes, dim=1)
        return [p.view(-1, *s) for p, s in zip(parts, self.shapes, strict=True)]

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        slots = self.slots(state)
        out = self.op(*[slots[i] for i in self.inputs])
        if self.last:
            return out
        return torch.cat([slots[k].flatten(1) for k in self.keep] + [out.flatten(1)], 1)

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}, keep={self.keep}, shapes={self.shapes}"


def lower(graph: Graph) -> nn.Sequential:
    """The graph as a chain of :class:`Step` s computing the same function (a chain graph is
    better served by :meth:`Graph.sequential`, which keeps its operators as they are)."""
    nodes = graph.nodes
    last_use = {INPUT: 0, **{i: 0 for i in range(len(nodes))}}
    for n, node in enumerate(nodes):
        for j in node.inputs:
            last_use[j] = n
    last_use[len(nodes) - 1] = len(nodes)
    slots, shapes = [INPUT], [tuple(graph.input_shape)]
    example = torch.zeros(1, *graph.input_shape,
                          dtype=next(graph.parameters(), torch.zeros(())).dtype)
    values = {INPUT: example}
    steps = []
    with torch.no_grad():
        for n, node in enumerate(nodes):
            keep = tuple(k for k, v in enumerate(slots) if last_use[v] > n)
            values[n] = node.op(*[values[j] for j in node.inputs])
            steps.append(Step(node.op, shapes, tuple(slots.index(j) for j in node.inputs), keep,
                              last=n == len(nodes) - 1, out_shape=values[n].shape[1:]))
            slots = [slots[k] for k in keep] + [n]
            shapes = [shapes[k] for k in keep] + [tuple(values[n].shape[1:])]
    return nn.Sequential(*steps)
