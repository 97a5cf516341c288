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
from certnet.verify import exact_min_margin


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


def test_certificates_through_clipped_relus_never_contradict_the_exact_oracle():
    """clamp(h, 0, t) = relu(h) - relu(h - t): tiny nets with clipped ReLUs whose thresholds
    the balls cross, rewritten exactly as ReLU networks for the oracle; every certifier that
    applies, in l_inf and l2: certified => robust, margins never above the exact minimum."""
    cases = certified = 0
    names = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        d, width, classes = 2 + seed % 2, 3, 2 + seed % 2
        first, last = torch.nn.Linear(d, width), torch.nn.Linear(width, classes)
        clip = ClippedReLU([width], 0.3)
        with torch.no_grad():
            for p in (*first.parameters(), *last.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 2)
            clip.threshold.uniform_(0.0, 0.6, generator=g)
        plain = torch.nn.Sequential(torch.nn.Flatten(), first, clip, last)
        models = [IBPNet(plain, (d,), classes).eval(),  # the bound certifiers
                  GloroNet(convert_sequential(plain, (d,)), (d,), classes).eval()]  # all
        t = clip.threshold.detach().double()
        relu_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 2 * width),
                                       torch.nn.ReLU(), torch.nn.Linear(2 * width, classes))
        relu_net = relu_net.double()
        with torch.no_grad():
            w, b = first.weight.double(), first.bias.double()
            relu_net[1].weight.copy_(torch.cat([w, w]))
            relu_net[1].bias.copy_(torch.cat([b, b - t]))
            relu_net[3].weight.copy_(torch.cat([last.weight, -last.weight], 1).double())
            relu_net[3].bias.copy_(last.bias.double())
        x = torch.rand(3, d, generator=g)
        torch.testing.assert_close(relu_net(x.double()), plain.double()(x.double()))
        plain.float()
        for model, norm in product(models, ("linf", "l2") if d == 2 else ("linf",)):
            for name in (*applicable(model, norm), "best"):
                cert = certify(model, x, 0.1, name, norm)
                names.add(name)
                for i in range(len(x)):
                    exact = exact_min_margin(relu_net, x[i], int(cert.pred[i]), 0.1, norm)
                    cases += 1
                    certified += bool(cert.certified[i])
                    assert not (cert.certified[i] and exact <= 0), (seed, name, norm)
                    if cert.margin is not None:
                        assert float(cert.margin[i]) <= exact + 1e-9 * (1 + abs(exact))
    assert certified >= 0.1 * cases and certified < cases, (certified, cases)
    assert {"lipschitz", "local-lipschitz", "crown"} <= names, names


def test_minmax_matches_torch_sorting_and_its_gradient():
    """The pair sort's custom backward is the gradient of (min, max) (gradcheck in float64,
    conv-shaped and dense inputs; forward mode, and double backward, whose bitwise routing
    switches to the differentiable torch.where); at a tie it routes each output's gradient to
    one input, a valid subgradient that keeps the gradient norm."""
    for shape in [(3, 4), (2, 6, 3, 3)]:
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(MinMax(), (x,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(MinMax(), (x,))
        half = shape[1] // 2
        a, b = x[:, :half], x[:, half:]
        assert torch.equal(MinMax()(x), torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1))
    tie = torch.ones(1, 2, requires_grad=True)
    MinMax()(tie).backward(torch.tensor([[2.0, 3.0]]))
    assert sorted(tie.grad.flatten().tolist()) == [2.0, 3.0]


def test_minmax_propagates_nan_and_keeps_the_memory_layout_irrelevant():
    x = torch.tensor([[float("nan"), 1.0, 2.0, 0.5]])
    y = MinMax()(x)
    assert torch.isnan(y[0, 0]) and torch.isnan(y[0, 2]) and y[0, 1] == 0.5 and y[0, 3] == 1.0
    z = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    half = 2
    expected = torch.cat([torch.minimum(z[:, :half], z[:, half:]),
                          torch.maximum(z[:, :half], z[:, half:])], 1)
    assert torch.equal(MinMax()(z), expected)


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
