"""A network as a small graph (the graph core of issue 27, after auto_LiRPA's traced graph of
one bound class per operator): nodes in topological order, each an ``nn.Module`` operator
applied to the outputs of earlier nodes (or the network input, :data:`INPUT`). Every operator
is a module of a registered layer type, so it carries its own bound rule, rounding rule and
spec (:class:`certnet.nn.layer_types.LayerType`). The bounds engine walks chains:
:meth:`Graph.chain` is the graph's chain (its operators for a chain graph, else the
lowering of :mod:`certnet.graph.lower`, whose steps carry the live values together).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certnet.errors import UnsupportedLayerError

#: the id standing for the network input in :attr:`Node.inputs`
INPUT = -1


@dataclass(frozen=True)
class Node:
    """``op`` applied to the outputs of the nodes ``inputs`` (ids of earlier nodes, or
    :data:`INPUT`); ``name`` says where it came from (e.g. the ONNX node's name and type)."""

    op: nn.Module
    inputs: tuple[int, ...]
    name: str


class Graph(nn.Module):
    """Nodes in topological order; the last one is the output. ``input_shape`` is one input's
    shape (no batch dimension)."""

    def __init__(self, nodes: list[Node], input_shape: tuple[int, ...]) -> None:
        super().__init__()
        for i, node in enumerate(nodes):
            if not node.inputs or any(j != INPUT and not 0 <= j < i for j in node.inputs):
                raise UnsupportedLayerError(f"{node.name}: its inputs {node.inputs} are "
                                            "not earlier nodes (the graph has a cycle?)")
        if not nodes:
            raise UnsupportedLayerError("the graph has no operator")
        self.nodes = nodes
        self.ops = nn.ModuleList(node.op for node in nodes)
        self.input_shape = tuple(input_shape)

    @classmethod
    def from_sequential(cls, layers: nn.Sequential, input_shape: tuple[int, ...]) -> Graph:
        """The chain of ``layers``: node i takes node i - 1's output."""
        return cls([Node(m, (i - 1 if i else INPUT,), f"layer {i} ({type(m).__name__})")
                    for i, m in enumerate(layers)], input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor] = []
        for node in self.nodes:
            args = [x if j == INPUT else values[j] for j in node.inputs]
            values.append(node.op(*args))
        return values[-1]

    def chain(self) -> nn.Sequential:
        """The chain the bounds engine walks, computing the same function exactly: the
        operators themselves for a chain graph (:meth:`sequential`), else one
        :class:`certnet.graph.lower.Step` per node over the values still live."""
        from certnet.graph.lower import lower

        if all(node.inputs == ((i - 1) if i else INPUT,) for i, node in enumerate(self.nodes)):
            return self.sequential()
        return lower(self)

    def sequential(self) -> nn.Sequential:
        """The same function as an ``nn.Sequential`` (the graph must be a chain: each node
        takes exactly the previous one's output), sharing the operators."""
        for i, node in enumerate(self.nodes):
            if node.inputs != ((i - 1) if i else INPUT,):
                raise UnsupportedLayerError(
                    f"{node.name} takes {len(node.inputs)} input(s) {node.inputs}, not "
                    "the previous node's output: certnet bounds chains of operators today "
                    "(residual adds and concatenations come with the graph engine)")
        return nn.Sequential(*[node.op for node in self.nodes])
