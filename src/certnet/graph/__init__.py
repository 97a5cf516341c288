"""Networks as graphs of nodes (operator module, input node ids), built from any source: an
``nn.Sequential`` or an ONNX file (:mod:`certnet.graph.onnx_import`)."""

from certnet.graph.graph import INPUT, Graph, Node

__all__ = ["INPUT", "Graph", "Node"]
