"""A new layer type from one file, by registration only (issue 25): a toy activation,
clamp(x, min=1/2), registered here with its spec, its flags (exact, so 1-Lipschitz in every
norm with no rounding), its bound rule and its oracle lowering. It is then stored in
checkpoints, accepted by every certifier whose maths applies (through the Python API and the
CLI), and its certificates hold against the exact oracle and against PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certnet.audit import attack_report
from certnet.bounds.rules import BoundRule
from certnet.certifiers import applicable, certify
from certnet.checkpoint import load, save_model
from certnet.cli import main
from certnet.data import load_dataset
from certnet.methods import IBPNet
from certnet.nn.layer_types import BY_CLASS, LAYER_TYPES, LayerType, register_layer_type
from certnet.nn.spec import build_layers
from certnet.verify import exact_min_margin
from certnet.verify.lowering import LOWERINGS, lowering


class Floor(nn.Module):
    """clamp(x, min=1/2): monotone, 1-Lipschitz in every norm, computed without rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0.5)


class FloorRule(BoundRule):
    """Its interval is its ends' images (a clamp: exact); no linear relaxation."""

    relaxable = False
    nonexpansive = True
    exact_interval = True

    def interval(self, m, inp):
        return inp.lo.clamp(min=0.5), inp.hi.clamp(min=0.5)

    def drift(self, m, error, inp):
        return error  # exact and 1-Lipschitz: float errors pass through, never grow


def _floor_ops(layer: Floor, shape: tuple[int, ...]):
    """clamp(z, 1/2) = 1/2 + relu(z - 1/2)."""
    n = int(np.prod(shape))
    eye, half = np.eye(n), np.full(n, 0.5)
    return [("affine", eye, -half), ("relu",), ("affine", eye, half)], shape


@pytest.fixture
def floor_layer():
    register_layer_type(LayerType(Floor, "floor", exact=True, rule=FloorRule()))
    lowering(Floor)(_floor_ops)
    yield
    del LAYER_TYPES["floor"], BY_CLASS[Floor], LOWERINGS[Floor]


def _net(shape: tuple[int, ...], hidden: int, classes: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return build_layers([
        {"type": "flatten"},
        {"type": "linear", "in_features": int(np.prod(shape)), "out_features": hidden,
         "bias": True},
        {"type": "floor"},
        {"type": "linear", "in_features": hidden, "out_features": classes, "bias": True}],
        shape)


#: the certifiers whose maths covers an exact 1-Lipschitz activation with an interval rule
EXPECTED = {"l2": {"lipschitz", "ibp", "crown-ibp", "crown", "alpha-crown"},
            "linf": {"linf-lipschitz", "ibp", "crown-ibp", "crown", "alpha-crown"}}


def test_a_layer_registered_in_one_file_is_certified_and_stored(floor_layer, tmp_path,
                                                                mnist_available, capsys):
    data = load_dataset("mnist", "test")
    model = IBPNet(_net((1, 28, 28), 32, 10, seed=0), (1, 28, 28), 10)
    save_model(tmp_path / "ckpt", model)
    loaded = load(tmp_path / "ckpt")
    assert type(loaded.layers[2]) is Floor
    x, y = data.images(slice(64)), data.y[:64]
    for norm, eps in (("l2", 0.05), ("linf", 2e-4)):
        names = set(applicable(loaded, norm))
        assert EXPECTED[norm] <= names, names
        for name in sorted(EXPECTED[norm]):
            cert = certify(loaded, x, eps, name, norm)
            assert bool(cert.certified.any()), (name, norm)  # the checks below bite
            report = attack_report(loaded, x, y, eps, steps=20, restarts=1, batch_size=64,
                                   certifier=name, norm=norm)
            assert report["flipped_certified"] == 0, (name, norm)
        assert main(["certify", str(tmp_path / "ckpt"), "--dataset", "mnist", "--limit", "16",
                     "--eps", str(eps), "--norm", norm, "--certifier", "best"]) == 0
        assert f"ibp/best {norm}" in capsys.readouterr().out


@pytest.mark.parametrize("norm, eps", [("l2", 0.2), ("linf", 0.1)])
def test_the_toy_layers_certificates_hold_against_the_exact_oracle(floor_layer, norm, eps):
    layers = _net((4,), 6, 3, seed=1)
    model = IBPNet(layers, (4,), 3)
    x = torch.rand(24, 4, generator=torch.Generator().manual_seed(2))
    proved = 0
    for name in sorted(EXPECTED[norm]):
        cert = certify(model, x, eps, name, norm)
        for i in cert.certified.nonzero().flatten().tolist():
            assert exact_min_margin(layers, x[i], int(cert.pred[i]), eps, norm) > 0, name
            proved += 1
    assert proved > 0
