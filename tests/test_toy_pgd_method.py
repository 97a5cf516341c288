"""A training method whose loss runs an attack, added from this one file (issue 25): PGD sits
below the methods, so a method in the style of SABR, TAPS or MTL-IBP can call it inside its
loss. Madry et al. 2018's adversarial training, registered here, trains through the Trainer,
saves, loads by its name, and is certified by the shared certifiers and audited by PGD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import certnet
from certnet.attacks import PGD
from certnet.audit import attack_report
from certnet.cli import main
from certnet.methods import METHODS, CertifiedModel, register_method
from certnet.schema import Positive
from certnet.train import TrainConfig, Trainer


class MadryPGD(CertifiedModel):
    """Cross-entropy on PGD points of the l_inf ball (Madry et al. 2018, Eq. 2.1)."""

    method = "toy-madry"
    norm = "linf"
    init = "default"
    default_certifier = "ibp"

    def __init__(self, layers: nn.Sequential, input_shape, num_classes,
                 attack_steps: Positive = 3) -> None:
        super().__init__(input_shape, num_classes)
        self.check_logits(layers)
        self.layers = layers
        self.attack_steps = attack_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def method_config(self):
        return {"attack_steps": self.attack_steps}

    def loss(self, x, y, eps):
        adv = PGD(self, eps, "linf", self.attack_steps, restarts=1)(x, y) if eps > 0 else x
        logits = self(adv)
        with torch.no_grad():
            clean = self(x).argmax(1) == y
        return F.cross_entropy(logits, y), {"clean": clean, "robust": logits.argmax(1) == y}


@pytest.fixture
def madry():
    register_method(MadryPGD)
    yield
    METHODS.pop("toy-madry")


def test_a_method_with_pgd_in_its_loss_plugs_in_from_one_file(tmp_path, madry,
                                                                mnist_available, capsys):
    config = TrainConfig(method="toy-madry", arch="dm-small", dataset="mnist", eps=0.05,
                         epochs=1, batch_size=64, train_limit=256, eval_limit=64, lr=1e-3,
                         method_kwargs={"attack_steps": 2})
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.fit()
    model = certnet.load(tmp_path / "run")
    assert type(model) is MadryPGD and model.attack_steps == 2
    test = trainer.test_data
    report = attack_report(model, test.images(slice(64)), test.y[:64], 0.05, steps=10,
                           restarts=1, batch_size=64)
    assert report["certifier"] == "ibp" and report["flipped_certified"] == 0
    assert main(["certify", str(tmp_path / "run"), "--limit", "32", "--certifier", "crown"]) == 0
    assert "toy-madry/crown linf" in capsys.readouterr().out
