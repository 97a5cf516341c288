"""Networks as graphs of nodes (operator module, input node ids), built from any source: an
``nn.Sequential``, an ONNX file (:mod:`certnet.graph.onnx_import`) or any ``nn.Module``
traced with torch.fx (:mod:`certnet.graph.fx_import`)."""

from certnet.graph.fx_import import from_module
from certnet.graph.graph import INPUT, Graph, Node

__all__ = ["INPUT", "Graph", "Node", "from_module"]
