"""torch.fx import (certnet.graph.fx_import): a module written as a forward with functional
calls becomes a Graph computing exactly its function; a chain feeds certnet's bound engine,
joins (residual add, concatenation) are refused by Graph.sequential naming the node, and
everything certnet does not model is one clear error naming it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.margins import margin_bounds
from certnet.errors import UnsupportedLayerError
from certnet.graph import Graph, from_module
from certnet.graph.ops import Add, Concat
from certnet.nn.lipschitz import LipschitzLinear
from certnet.threat import ThreatModel


class ConvNet(nn.Module):
    """conv -> F.relu -> torch.flatten -> linear, written as a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class ViewNet(nn.Module):
    """The other flatten spellings: x.view(x.size(0), -1), x.reshape(x.shape[0], -1),
    x.flatten(1), x.view(-1, n), with tanh and tensor-method relu."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).relu()
        h = {"view": lambda: h.view(h.size(0), -1),
             "reshape": lambda: h.reshape(h.shape[0], -1),
             "method": lambda: h.flatten(1),
             "literal": lambda: h.view(-1, 72)}[self.spelling]()
        return self.fc(h)


class Tail(nn.Module):
    """conv, then ``step`` (a reshape), then relu."""

    def __init__(self, step) -> None:
        super().__init__()
        self.conv, self.step = nn.Conv2d(1, 2, 3), step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(self.conv(x)).relu()


class Residual(nn.Module):
    """x + conv(relu(conv(x))): a ResNet-style block, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((x + self.conv2(F.relu(self.conv1(x)))).flatten(1))


class Branches(nn.Module):
    """Two branches from h = relu(a(x)), h and b(h), concatenated along the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(4, 3), nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(torch.cat([h, self.b(h)], dim=1))


class Wrap(nn.Module):
    """``layer`` between two linear layers (features 5 -> 5 -> 3), with an optional
    functional step."""

    def __init__(self, layer: nn.Module, step=None) -> None:
        super().__init__()
        self.fc1, self.layer, self.fc2 = nn.Linear(5, 5), layer, nn.Linear(5, 3)
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.fc1(x))
        return self.fc2(self.step(h) if self.step is not None else h)


def _same(graph: Graph, module: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.rand(7, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(graph(x), module(x))


def test_chain_is_a_sequential_the_bound_engine_takes() -> None:
    torch.manual_seed(0)
    net = ConvNet().eval()
    graph = from_module(net, (1, 8, 8))
    seq = graph.sequential()
    assert [type(m) for m in seq] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    assert seq[0] is net.conv and seq[3] is net.fc  # the module's own layers, shared
    _same(graph, net, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(seq(x), net(x))
        logits = net(x)
    ref = logits.argmax(1)
    lower = margin_bounds(seq, x, ThreatModel("linf", 0.01), ref)
    true = logits.gather(1, ref[:, None]) - logits
    others = true[torch.arange(4)[None, :] != ref[:, None]].view(3, 3)
    assert lower.shape == (3, 3) and bool((lower <= others).all())


@pytest.mark.parametrize("spelling", ["view", "reshape", "method", "literal"])
def test_flatten_spellings(spelling: str) -> None:
    torch.manual_seed(0)
    net = ViewNet(spelling).eval()
    graph = from_module(net, (1, 8, 8))
    assert [type(m) for m in graph.sequential()] == [nn.Conv2d, nn.Tanh, nn.ReLU,
                                                     nn.Flatten, nn.Linear]
    _same(graph, net, (1, 8, 8))


@pytest.mark.parametrize(("step", "error"), [
    (lambda h: h.view(1, -1), r"'view' \(Tensor\.view\): a reshape to \[1, -1\]"),
    (lambda h: h.view(2, -1), r"'view' \(Tensor\.view\): a reshape to \[2, -1\]"),
    (torch.flatten, r"'flatten' \(torch\.flatten\): reshapes \(2, 2, 6, 6\) to \(144,\)"),
    (lambda h: h.view(-1, 36), r"reshapes \(2, 2, 6, 6\) to \(4, 36\)"),
    (lambda h: h.view(h.size(1), -1), "a reshape to"),
    (lambda h: h[:, 0], r"'getitem' \(operator\.getitem\): indexing tensors"),
    (lambda h: h.view(h.size(0) * 2, -1), r"'size' \(Tensor\.size\): a size used by 'mul'")])
def test_reshapes_that_touch_the_batch_are_refused(step, error: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=error):
        from_module(Tail(step).eval(), (1, 8, 8))


def test_residual_block_is_a_graph_that_sequential_refuses_naming_the_add() -> None:
    torch.manual_seed(0)
    net = Residual().eval()
    graph = from_module(net, (2, 5, 5))
    add = next(i for i, n in enumerate(graph.nodes) if isinstance(n.op, Add))
    assert graph.nodes[add].inputs == (-1, add - 1)  # the input, then conv2's output
    _same(graph, net, (2, 5, 5))
    with pytest.raises(UnsupportedLayerError, match=r"fx node 'add' \(operator\.add\) "
                                                    "takes 2 input"):
        graph.sequential()


def test_concatenation_is_a_graph_that_sequential_refuses_naming_the_cat() -> None:
    torch.manual_seed(0)
    net = Branches().eval()
    graph = from_module(net, (6,))
    cat = next(n for n in graph.nodes if isinstance(n.op, Concat))
    assert cat.op.dim == 1 and cat.inputs == (1, 2)  # h (relu), b(h)
    _same(graph, net, (6,))
    with pytest.raises(UnsupportedLayerError, match=r"fx node 'cat' \(torch\.cat\)"):
        graph.sequential()


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock style: BatchNorm, ReLU(inplace=True), ``out += identity``;
    then a certnet layer (kept whole: registered types are not traced into)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2),
                                  nn.ReLU(inplace=True), nn.Conv2d(2, 2, 3, padding=1))
        self.relu = nn.ReLU(inplace=True)
        self.head = LipschitzLinear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += x
        return self.head(self.relu(out).view(x.size(0), -1))


def test_torchvision_style_block_with_a_certnet_layer() -> None:
    torch.manual_seed(0)
    net = TorchvisionBlock().eval()
    net.body[1].running_mean.uniform_()
    graph = from_module(net, (2, 4, 4))
    assert [type(n.op).__name__ for n in graph.nodes] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Add", "ReLU", "Flatten", "LipschitzLinear"]
    assert graph.nodes[4].inputs == (3, -1) and graph.nodes[-1].op is net.head
    _same(graph, net, (2, 4, 4))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_module_is_one_clear_error() -> None:
    with pytest.raises(UnsupportedLayerError) as err:
        from_module(DataDependent(), (4,))
    message = str(err.value)
    assert "DataDependent could not be traced by torch.fx" in message
    assert "\n" not in message


def test_unknown_submodule_type_is_named() -> None:
    with pytest.raises(UnsupportedLayerError,
                       match=r"fx node 'layer' \(layer: ELU\): layer type ELU is not "
                             "supported"):
        from_module(Wrap(nn.ELU()), (5,))


def test_unknown_function_is_named() -> None:
    with pytest.raises(UnsupportedLayerError,
                       match=r"fx node 'elu' \(torch\.nn\.functional\.elu\): not "
                             r"supported \(not bounded yet.*\); supported: .*torch\.relu"):
        from_module(Wrap(nn.Identity(), F.elu), (5,))


@pytest.mark.parametrize("step", [lambda h: h * h, lambda h: h / h, lambda h: h - h,
                                  lambda h: 1.0 / h])
def test_products_of_computed_values_are_refused(step) -> None:
    """x * c, x / c, x + c, x - c, c - x are Scales (tests/test_scale_ops.py); products,
    quotients and differences of two computed values, and reciprocals, are refused."""
    with pytest.raises(UnsupportedLayerError, match="constant"):
        from_module(Wrap(nn.Identity(), step), (5,))


def test_dropout_dropped_in_eval_and_refused_in_training() -> None:
    torch.manual_seed(0)
    net = Wrap(nn.Dropout(0.5), lambda h: F.dropout(h, 0.3, training=False)).eval()
    graph = from_module(net, (5,))
    assert [type(m) for m in graph.sequential()] == [nn.Linear, nn.Linear]
    _same(graph, net, (5,))
    with pytest.raises(UnsupportedLayerError, match=r"fx node 'layer' \(layer: Dropout\): "
                                                    "dropout in training mode"):
        from_module(net.train(), (5,))
    with pytest.raises(UnsupportedLayerError, match="fx node 'dropout'.*training mode"):
        from_module(Wrap(nn.Identity(), F.dropout).eval(), (5,))


def test_training_batchnorm_refused_before_running() -> None:
    net = Wrap(nn.BatchNorm1d(5))
    before = net.layer.running_mean.clone()
    with pytest.raises(UnsupportedLayerError, match="BatchNorm in training mode"):
        from_module(net, (5,))
    assert torch.equal(net.layer.running_mean, before)  # nothing ran
    assert from_module(net.eval(), (5,)).nodes[1].op is net.layer


def test_forward_hook_is_refused() -> None:
    net = Wrap(nn.ReLU())
    net.layer.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnsupportedLayerError, match="forward hooks"):
        from_module(net, (5,))


class InPlace(nn.Module):
    """y += x on a value read again afterwards: fx records a new sum, not the update."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        z = y
        z += x
        return y.relu()


def test_a_trace_that_differs_from_forward_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="computes a different function"):
        from_module(InPlace(), (4,))
