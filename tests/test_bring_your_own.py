"""Bring your own network (issue 26): every method wraps a plain trained ``nn.Sequential`` with
``from_sequential``, eval-mode dropout is the identity, other modules get a certnet error
saying what is supported, and the checkpoint names the wrapping method and its norm."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from certnet.checkpoint import load, save_model
from certnet.errors import UnsupportedLayerError
from certnet.methods import METHODS, GloroNet, IBPNet


def _plain(dropout: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    extra = [nn.Dropout(0.5)] if dropout else []
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), *extra, nn.Linear(12, 3))


@pytest.mark.parametrize("method", ["gloro", "ibp", "crown-ibp"])
def test_every_method_wraps_a_plain_sequential_and_saves_as_itself(method, tmp_path):
    cls = METHODS[method]
    model = cls.from_sequential(_plain(dropout=True).eval(), (1, 4, 4))
    assert model.num_classes == 3 and not any(type(m) is nn.Dropout for m in model.layers)
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(model(x), _plain()(x), atol=1e-6)
    save_model(tmp_path / "ckpt", model)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (config["method"], config["norm"]) == (method, cls.norm)
    loaded = load(tmp_path / "ckpt")
    assert torch.equal(loaded.certify(x, 0.01).radius, model.certify(x, 0.01).radius)


def test_training_mode_dropout_and_other_modules_are_refused_with_the_reason():
    with pytest.raises(UnsupportedLayerError, match="model.eval"):
        GloroNet.from_sequential(_plain(dropout=True).train(), (1, 4, 4))

    class Graph(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedLayerError, match="expected an nn.Sequential, got Graph"):
        IBPNet.from_sequential(Graph(), (1, 4, 4))


def test_a_failed_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A network with a layer no spec describes, or a write failing half way: no directory,
    nothing beside it."""
    from certnet import checkpoint

    model = IBPNet.from_sequential(_plain().eval(), (1, 4, 4))
    model.layers.insert(1, _Unregistered())
    with pytest.raises(UnsupportedLayerError, match="cannot describe"):
        save_model(tmp_path / "ckpt", model)
    assert list(tmp_path.iterdir()) == []

    def full_disk(path, payload):
        raise OSError(28, "No space left on device")

    good = IBPNet.from_sequential(_plain().eval(), (1, 4, 4))
    monkeypatch.setattr(checkpoint, "write_json", full_disk)
    with pytest.raises(OSError):
        save_model(tmp_path / "ckpt", good)
    assert list(tmp_path.iterdir()) == []


class _Unregistered(nn.Module):
    def forward(self, x):
        return x
