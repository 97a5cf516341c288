"""certnet.bounded: any network (ONNX file, nn.Sequential) certified by the certifiers whose
maths applies, with the same bits as the trained-model path, never contradicted by PGD."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import certnet
from certnet.attacks import PGD
from certnet.certifiers import applicable
from certnet.errors import InputError
from certnet.methods import IBPNet
from certnet.properties import linf_robustness

MNIST_FC = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp" / \
    "mnist_fc" / "onnx" / "mnist-net_256x2.onnx"


def _seq(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 4)).eval()


def test_a_sequential_certifies_as_its_trained_twin():
    seq = _seq()
    x = torch.rand(32, 3, 4, generator=torch.Generator().manual_seed(0))
    ours = certnet.bounded(seq, (3, 4))
    twin = IBPNet.from_sequential(seq, (3, 4))
    for certifier in ("ibp", "crown", "alpha-crown"):
        a = ours.certify(x, 0.05, certifier=certifier)
        b = twin.certify(x, 0.05, certifier=certifier)
        assert torch.equal(a.pred, b.pred) and torch.equal(a.certified, b.certified)
    assert set(applicable(ours, "linf")) >= {"ibp", "crown", "alpha-crown"}


def test_certified_points_survive_pgd_and_properties_agree():
    seq = _seq(1)
    net = certnet.bounded(seq, (3, 4))
    x = torch.rand(64, 3, 4, generator=torch.Generator().manual_seed(1))
    for eps in (0.02, 0.1):
        cert = net.certify(x, eps, certifier="crown")
        adv = PGD(seq, eps=eps, norm="linf", steps=50, restarts=3)(x, cert.pred)
        with torch.no_grad():
            flipped = seq(adv).argmax(1) != cert.pred
        assert not (flipped & cert.certified).any()
        # the same question as a VNN-LIB property: holds wherever CROWN certified
        for i in torch.nonzero(cert.certified).flatten()[:3].tolist():
            prop = linf_robustness(x[i].double().flatten(), eps, int(cert.pred[i]), 4)
            assert net.verify(prop, methods=("crown",)).status == "holds"


@pytest.mark.skipif(not MNIST_FC.is_file(), reason="no shared VNN-COMP network")
def test_an_onnx_file_certifies_and_verifies():
    pytest.importorskip("onnx")
    net = certnet.bounded(MNIST_FC)
    assert net.input_shape == (784, 1) and net.num_classes == 10
    x = torch.rand(4, 784, 1, generator=torch.Generator().manual_seed(2))
    cert = net.certify(x, 0.0, certifier="crown")  # radius 0: every point is certified
    assert cert.certified.all()


def test_bad_inputs_are_clear_errors():
    with pytest.raises(InputError, match="input_shape"):
        certnet.bounded(_seq())
    with pytest.raises(InputError, match="vector of at least two"):
        certnet.bounded(nn.Sequential(nn.Flatten(), nn.Linear(12, 1)), (12,))


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, stride=2), nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(torch.relu(self.conv(x)), 1))


class _Residual(_Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.head(torch.flatten(h + torch.relu(h), 1))


def test_any_traceable_module_certifies_residual_ones_included():
    x = torch.rand(16, 1, 7, 7, generator=torch.Generator().manual_seed(3))
    for kind in (_Chain, _Residual):
        torch.manual_seed(3)
        module = kind().eval()
        net = certnet.bounded(module, (1, 7, 7))
        for eps in (0.003, 0.03):
            cert = net.certify(x, eps, certifier="crown")
            with torch.no_grad():
                assert torch.equal(cert.pred, module(x).argmax(1))
            adv = PGD(module, eps=eps, norm="linf", steps=40, restarts=2)(x, cert.pred)
            with torch.no_grad():
                flipped = module(adv).argmax(1) != cert.pred
            assert not (flipped & cert.certified).any()
        assert net.certify(x, 0.003, certifier="crown").certified.any()


def test_lipschitz_certifiers_say_what_they_need_and_how_to_get_it():
    """A plain torch head has no sound l2 bound registered: the Lipschitz certifiers refuse
    naming the last layer and the conversion, and the bound-propagation ones still apply."""
    from certnet.errors import ConfigError

    net = certnet.bounded(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3)), (4,))
    for name in ("lipschitz", "local-lipschitz"):
        with pytest.raises(ConfigError, match=r"ends in Linear; .*convert_sequential"):
            net.certify(torch.rand(2, 4), 0.01, name, "linf")
    assert {"ibp", "crown"} <= set(applicable(net, "linf"))


def test_a_plain_relu_chain_gets_lipschitz_certificates_as_its_gloro_twin():
    """Plain Linear layers take their Lipschitz form (convert_sequential), so the Lipschitz
    certifiers apply to a plain chain: the same certificates as GloroNet.from_sequential."""
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 5)).eval()
    x = torch.rand(16, 1, 4, 4)
    net = certnet.bounded(seq, (1, 4, 4))
    twin = certnet.GloroNet.from_sequential(seq, (1, 4, 4))
    assert "lipschitz" in applicable(net, "l2")
    ours = net.certify(x, 0.02, norm="l2", certifier="lipschitz")
    theirs = twin.certify(x, 0.02, norm="l2", certifier="lipschitz")
    assert torch.equal(ours.certified, theirs.certified) and torch.equal(ours.radius,
                                                                         theirs.radius)
    assert torch.equal(net(x), seq(x))  # the network itself is untouched
