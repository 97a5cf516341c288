"""Clipped activations (Huang et al. 2021): their function, thresholds kept valid by the
Trainer, specs, and GloRo certification through them."""

from __future__ import annotations

from itertools import product

import pytest
import torch

from certnet.archs import build_arch
from certnet.certifiers import applicable, certify
from certnet.config import TrainConfig
from certnet.errors import ConfigError, InputError
from certnet.methods.bound_prop import IBPNet
from certnet.methods.gloro import GloroNet
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.lipschitz import convert_sequential
from certnet.nn.spec import build_layers, describe_layers
from certnet.train import Trainer
from certnet.verify import exact_min_margin, min_margin


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


@pytest.mark.parametrize("activation", ["clipped-relu", "clipped-minmax"])
def test_certificates_through_clipped_activations_never_contradict_the_exact_oracle(activation):
    """Tiny nets with clipped ReLUs / clipped MinMax whose thresholds the balls cross, against
    the exact oracle (which rewrites the clamps exactly with ReLUs): every certifier that
    applies, in l_inf and l2: certified => robust, margins never above the exact minimum."""
    cases = certified = 0
    names = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        d, width, classes = 2 + seed % 2, 4, 2 + seed % 2
        first, last = torch.nn.Linear(d, width), torch.nn.Linear(width, classes)
        clip = ClippedReLU([width], 0.3) if activation == "clipped-relu" else \
            ClippedMinMax([width], -0.3, 0.3)
        with torch.no_grad():
            for p in (*first.parameters(), *last.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 2)
            if activation == "clipped-relu":
                clip.threshold.uniform_(0.0, 0.6, generator=g)
            else:
                clip.lower.uniform_(-0.6, 0.0, generator=g)
                clip.upper.uniform_(0.0, 0.6, generator=g)
        plain = torch.nn.Sequential(torch.nn.Flatten(), first, clip, last)
        models = [IBPNet(plain, (d,), classes).eval(),  # the bound certifiers
                  GloroNet(convert_sequential(plain, (d,)), (d,), classes).eval()]  # all
        x = torch.rand(3, d, generator=g)
        for model, norm in product(models, ("linf", "l2") if d == 2 else ("linf",)):
            for name in (*applicable(model, norm), "best"):
                cert = certify(model, x, 0.1, name, norm)
                names.add(name)
                for i in range(len(x)):
                    exact = exact_min_margin(plain, x[i], int(cert.pred[i]), 0.1, norm)
                    cases += 1
                    certified += bool(cert.certified[i])
                    assert not (cert.certified[i] and exact <= 0), (seed, name, norm)
                    if cert.margin is not None:
                        assert float(cert.margin[i]) <= exact + 1e-9 * (1 + abs(exact))
    assert certified >= 0.1 * cases and certified < cases, (certified, cases)
    assert {"lipschitz", "local-lipschitz", "crown"} <= names, names


def test_the_oracle_encodes_clipped_activations_exactly():
    """The oracle's ReLU rewrite of each clamp: its minimum is attained (the float64 forward
    of its minimiser agrees with the solver) and no sampled point of the ball goes below it."""
    g = torch.Generator().manual_seed(3)
    for clip in (ClippedReLU([4], 0.2), ClippedMinMax([4], -0.2, 0.2)):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 4), clip,
                                  torch.nn.Linear(4, 3))
        with torch.no_grad():
            for p in (*net[1].parameters(), *net[3].parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
        x = torch.full((2,), 0.5)
        for norm, method in (("linf", "milp"), ("linf", "enumerate"), ("l2", "enumerate")):
            result = min_margin(net, x, 0, 0.3, norm, method=method)
            assert result.margin == pytest.approx(result.bound, abs=1e-6)
            offsets = torch.rand(4000, 2, generator=g) * 2 - 1
            if norm == "l2":
                offsets = offsets[offsets.norm(dim=1) <= 1]
            logits = net.double()((x + 0.3 * offsets).double())
            net.float()
            sampled = (logits[:, :1] - logits[:, 1:]).min()
            assert result.margin <= float(sampled) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pair_sort_routing_matches_where_bit_for_bit(dtype, layout) -> None:
    """MinMax's backward exchanges gradient halves on the floats' bits: exactly torch.where's
    values, NaN, inf and -0.0 included, in either memory layout."""
    from certnet.nn.activations import _swap_where

    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 6, 3, 3, generator=g).to(dtype)
    t[0, :, 0, 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1.0])
    t = t.contiguous(memory_format=layout)
    swap = torch.rand(8, 3, 3, 3, generator=g) > 0.5
    low, high = t[:, :3], t[:, 3:]
    want = torch.cat([torch.where(swap, high, low), torch.where(swap, low, high)], dim=1)
    got = _swap_where(swap, t)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert got.dtype == dtype and torch.equal(got.view(bits), want.view(bits))
