"""Opt-in soundness suite (``pytest -m slow``): many more random bound checks and a long PGD
campaign against a model trained on full MNIST."""

import pytest
import torch

from certnet.audit import attack_report
from certnet.data import load_dataset
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear
from certnet.train import TrainConfig, Trainer

pytestmark = pytest.mark.slow


def _exact_conv_norm(conv: LipschitzConv2d, shape: tuple[int, int, int]) -> float:
    n = shape[0] * shape[1] * shape[2]
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    out = torch.nn.functional.conv2d(basis, conv.weight.double(), None, conv.stride,
                                     conv.padding)
    return float(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))


def test_conv_bounds_on_2000_random_layers():
    gen = torch.Generator().manual_seed(0)
    for _ in range(2000):
        c_in, c_out = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        k = int(torch.randint(1, 6, (1,), generator=gen))
        stride = int(torch.randint(1, 4, (1,), generator=gen))
        padding = int(torch.randint(0, k, (1,), generator=gen))
        size = int(torch.randint(max(k - 2 * padding, 1), 12, (1,), generator=gen))
        conv = LipschitzConv2d(c_in, c_out, k, stride=stride, padding=padding)
        scale = 10.0 ** float(torch.empty(1).uniform_(-8, 2, generator=gen))
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * scale)
        conv.set_input_shape((c_in, size, size))
        exact = _exact_conv_norm(conv, (c_in, size, size))
        assert float(conv.lipschitz_bound()) >= exact, (c_in, c_out, k, stride, padding, size)


def test_dense_bounds_on_2000_random_matrices():
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        m, n = (int(v) for v in torch.randint(1, 64, (2,), generator=gen))
        layer = LipschitzLinear(n, m)
        u, _, vh = torch.linalg.svd(torch.randn(m, n, generator=gen), full_matrices=False)
        s = 10.0 ** torch.empty(min(m, n)).uniform_(-12, 3, generator=gen)
        with torch.no_grad():
            layer.weight.copy_((u * s) @ vh)
        exact = float(torch.linalg.matrix_norm(layer.weight.double(), ord=2))
        assert float(layer.lipschitz_bound()) >= exact


def test_long_pgd_never_flips_a_certified_point(tmp_path, mnist_available):
    config = TrainConfig(epochs=5, eps=0.3, eps_train_factor=1.5, eval_every=0, seed=3)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.fit()
    test = load_dataset("mnist", "test")
    for eps in (0.3, 1.0):
        report = attack_report(trainer.model, test.images(slice(1000)), test.y[:1000], eps,
                               steps=200, restarts=10, batch_size=500)
        assert report["flipped_certified"] == 0, report["violation_details"][:5]
        assert report["certified_rate"] > 0.05
