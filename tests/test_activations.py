"""Clipped activations (Huang et al. 2021): their function, thresholds kept valid by the
Trainer, specs, and GloRo certification through them."""

from __future__ import annotations

import pytest
import torch

from certnet.archs import build_arch
from certnet.config import TrainConfig
from certnet.errors import ConfigError, InputError
from certnet.methods.gloro import GloroNet
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.spec import build_layers, describe_layers
from certnet.train import Trainer


def test_clipped_relu_and_minmax_compute_their_functions():
    relu = ClippedReLU([3], init=1.0)
    x = torch.tensor([[-1.0, 0.5, 2.0]])
    assert torch.equal(relu(x), torch.tensor([[0.0, 0.5, 1.0]]))
    mm = ClippedMinMax([4], lower=-1.0, upper=1.0)
    x = torch.tensor([[-3.0, 0.2, 5.0, 0.1]])  # pairs (-3, 5) and (0.2, 0.1)
    assert torch.equal(mm(x), torch.tensor([[-1.0, 0.1, 1.0, 0.2]]))
    wide = ClippedMinMax([4, 2, 2], lower=-1e9, upper=1e9)
    x = torch.randn(3, 4, 2, 2)
    assert torch.equal(wide(x), MinMax()(x))  # thresholds far away: plain MinMax
    with pytest.raises(InputError):
        relu(torch.zeros(2, 4))
    with pytest.raises(InputError, match="even"):
        ClippedMinMax([3])


def test_the_trainer_keeps_thresholds_valid(tmp_path, mnist_available):
    config = TrainConfig(method="gloro", arch="2c2f", arch_kwargs={"activation": "clipped-relu"},
                         epochs=1, batch_size=64, lr=0.5, train_limit=128, eval_limit=16)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    with torch.no_grad():
        for m in trainer.model.modules():
            if type(m) is ClippedReLU:
                m.threshold.fill_(0.01)
    trainer.fit()
    thresholds = [m.threshold for m in trainer.model.modules() if type(m) is ClippedReLU]
    assert len(thresholds) == 3 and all((t >= 0).all() for t in thresholds)


@pytest.mark.parametrize("activation", ["clipped-relu", "clipped-minmax"])
def test_specs_round_trip_and_gloro_certifies_through_them(activation):
    layers = build_arch("2c2f", (1, 12, 12), 4, seed=0, activation=activation)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(0.1 * torch.randn_like(p))
    rebuilt = build_layers(describe_layers(layers), (1, 12, 12))
    rebuilt.load_state_dict(layers.state_dict())
    x = torch.rand(5, 1, 12, 12)
    assert torch.equal(rebuilt(x), layers(x))
    model = GloroNet(layers, (1, 12, 12), 4).eval()
    for certifier in ("lipschitz", "ibp", "crown", "best"):
        assert model.certify(x, 0.01, certifier=certifier).pred.shape == (5,)


def test_unknown_activation_names_the_choices():
    with pytest.raises(ConfigError, match="clipped-relu"):
        build_arch("2c2f", (1, 12, 12), 4, activation="gelu")
