"""PGD and the attack harness: the attack respects its threat model, finds adversarial examples
where they provably exist, and never flips a point a certifier calls robust."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certnet.archs import build_arch
from certnet.attacks import PGD, margin_loss, perturbation_norm
from certnet.audit import attack_report
from certnet.certifiers import CERTIFIERS, Certificate, Certifier, register_certifier
from certnet.errors import CertnetError, ConfigError, DataError, InputError
from certnet.methods.base import CertifiedModel
from certnet.methods.gloro import GloroNet
from certnet.nn.lipschitz import convert_sequential


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 5))


def linear_problem(num_classes: int, norm: str, n: int = 300, dim: int = 20, seed: int = 0):
    """A linear classifier and points in [0.4, 0.6]^dim with their exact distance to the
    nearest decision boundary (l2: gap / ||w_y - w_j||_2; l_inf: gap / ||w_y - w_j||_1)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(num_classes, dim, generator=g))
        linear.bias.copy_(-linear.weight @ torch.full((dim,), 0.5))
    model = nn.Sequential(linear)
    x = 0.4 + 0.2 * torch.rand(n, dim, generator=g)
    with torch.no_grad():
        logits = model(x).double()
    pred = logits.argmax(1)
    w = linear.weight.detach().double()
    diff = w[pred].unsqueeze(1) - w.unsqueeze(0)  # (n, C, dim): w_y - w_j
    dual = diff.norm(dim=-1) if norm == "l2" else diff.abs().sum(-1)
    gap = logits.gather(1, pred.unsqueeze(1)) - logits
    dist = (gap / dual).scatter(1, pred.unsqueeze(1), float("inf")).min(1).values
    return model, x, pred, dist


# -- the threat model ------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("l2", 1.5), ("linf", 0.2)])
def test_pgd_stays_in_ball_and_box(norm, eps):
    model = small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[:4] = (x[:4] > 0.5).float()  # pixels exactly on the box faces
    y = torch.randint(0, 5, (16,), generator=g)
    model.train()
    model[1].eval()  # mixed modes must survive the attack
    x_adv = PGD(model, eps, norm, steps=10, restarts=4)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (perturbation_norm(x_adv - x, norm) <= eps).all()
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())
    # Per-point radii, including 0 (the attack must return x itself there).
    radii = torch.linspace(0, eps, 16)
    x_adv = PGD(model, radii, norm, steps=5, restarts=3)(x, y)
    assert (perturbation_norm(x_adv - x, norm) <= radii.double()).all()
    assert torch.equal(x_adv[0], x[0])


def test_pgd_is_deterministic_and_seeded():
    model = small_cnn()
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(8, dtype=torch.long)
    a = PGD(model, 0.5, "l2", steps=5, restarts=3, seed=7)(x, y)
    b = PGD(model, 0.5, "l2", steps=5, restarts=3, seed=7)(x, y)
    assert torch.equal(a, b)


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
    assert torch.allclose(margin_loss(logits, torch.tensor([0, 1])), torch.tensor([-1.0, 0.0]))


def test_pgd_rejects_bad_arguments():
    model = small_cnn()
    x, y = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ConfigError):
        PGD(model, 0.1, "l1")
    with pytest.raises(ConfigError):
        PGD(model, 0.1, "l2", steps=0)
    with pytest.raises(ConfigError):
        PGD(model, 0.1, "l2", restarts=0)
    with pytest.raises(InputError):
        PGD(model, -0.1, "l2")
    with pytest.raises(InputError):
        PGD(model, 0.1, "l2", steps=1)(x * 2, y)
    with pytest.raises(InputError):
        PGD(model, 0.1, "l2", steps=1)(x, y.float())
    with pytest.raises(InputError):
        PGD(model, 0.1, "l2", steps=1)(x, y + 5)
    with pytest.raises(InputError):
        PGD(model, torch.ones(3), "l2", steps=1)(x, y)
    assert issubclass(InputError, CertnetError)


# -- finds what exists, and nothing that does not --------------------------------------------

@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("num_classes", [2, 4])
def test_pgd_matches_exact_linear_boundary(norm, num_classes):
    model, x, pred, dist = linear_problem(num_classes, norm)
    eps = float(dist.median())
    assert eps < 0.35  # the optimal perturbation stays inside the pixel box
    x_adv = PGD(model, eps, norm, steps=30, restarts=4)(x, pred)
    with torch.no_grad():
        flipped = model(x_adv).argmax(1) != pred
    must, cannot = dist < 0.97 * eps, dist > eps * (1 + 1e-5)
    assert must.sum() > 50 and cannot.sum() > 50
    assert flipped[must].all(), f"PGD missed {int((must & ~flipped).sum())} easy points"
    assert not flipped[cannot].any()
    # The distance PGD needed can never beat the exact one.
    assert (perturbation_norm(x_adv - x, norm)[flipped] >= dist[flipped] * (1 - 1e-5)).all()


class _Overclaiming(CertifiedModel):
    """A model with a deliberately unsound certifier that certifies everything."""

    method = "overclaiming"
    norm = "l2"
    default_certifier = "overclaim"

    def __init__(self, model: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__((dim,), num_classes)
        self.model = model

    def forward(self, x):
        return self.model(x)


class _OverclaimCertifier(Certifier):
    name = "overclaim"

    def applies(self, model, norm):
        return None if isinstance(model, _Overclaiming) else "not an overclaiming model"

    @torch.no_grad()
    def certify(self, model, x, threat):  # certifiers receive float64 batches
        pred = model(x.float()).argmax(1)
        return Certificate(pred, torch.ones_like(pred, dtype=torch.bool),
                           torch.full(pred.shape, float("inf")))


@pytest.fixture
def overclaim_certifier():
    register_certifier(_OverclaimCertifier())
    yield
    CERTIFIERS.pop("overclaim")


def test_attack_report_catches_an_unsound_certifier(overclaim_certifier):
    model, x, pred, dist = linear_problem(3, "l2")
    eps = float(dist.median())
    fake = _Overclaiming(model, x.shape[1], 3)
    report = attack_report(fake, x, pred, eps, steps=30, restarts=2, batch_size=128)
    assert report["certified_rate"] == 1.0 and report["vra"] == 1.0
    assert report["flipped_certified"] > 0
    flagged = torch.zeros(len(x), dtype=torch.bool)
    flagged[report["violations"]] = True
    assert flagged[dist < 0.97 * eps].all() and not flagged[dist > eps].any()
    assert report["flipped_certified"] == len(report["violations"]) == \
        len(report["violation_details"])
    detail = report["violation_details"][0]
    assert detail["distance"] <= eps * (1 + 1e-6) and detail["adv_pred"] != detail["pred"]
    assert report["robust_accuracy"] == pytest.approx(1 - report["attack_success_rate"])


# -- soundness of GloRo certificates ---------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_gloro():
    from certnet.data import load_dataset

    try:
        train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    except DataError as err:
        pytest.skip(f"MNIST unavailable: {err}")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    subset = torch.randperm(len(train), generator=g)[:4096]
    x, y = train.images(subset), train.y[subset]
    model = GloroNet(build_arch("2c2f", (1, 28, 28), 10, seed=0), (1, 28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for step in range(200):
        batch = torch.randint(0, len(x), (128,), generator=g)
        loss, _ = model.loss(x[batch], y[batch], 0.3 * min(1.0, step / 100))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.converge()
    model.eval()
    return model, test.images(slice(128)), test.y[:128]


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.5])
def test_pgd_never_flips_certified_gloro_points(mnist_gloro, eps):
    model, x, y = mnist_gloro
    report = attack_report(model, x, y, eps, steps=30, restarts=3, batch_size=64)
    assert report["flipped_certified"] == 0, report["violation_details"]
    assert report["certified_rate"] > 0.5  # the test is not vacuous
    assert report["attack_success_rate"] > 0  # nor is the attack
    assert report["vra"] <= report["robust_accuracy"] <= report["clean_accuracy"]


def test_gloro_radius_below_every_distance_pgd_needs(mnist_gloro):
    model, x, _ = mnist_gloro
    cert = model.certify(x, 0.3)
    assert cert.certified.any()
    radius = cert.radius.clamp_max(10.0)
    with torch.no_grad():
        # Attacked exactly at its certified radius, no point may flip ...
        x_adv = PGD(model, radius, "l2", steps=30, restarts=3)(x, cert.pred)
        assert (model(x_adv).argmax(1) == cert.pred).all()
        # ... while a few times further out PGD must get there for most points (the
        # certificate is not vacuous and the attack is strong), and wherever it flips at
        # distance r the certified radius is at most r.
        x_adv = PGD(model, 4 * radius, "l2", steps=30, restarts=3)(x, cert.pred)
        flipped = model(x_adv).argmax(1) != cert.pred
    distance = perturbation_norm(x_adv - x, "l2")
    assert flipped[cert.certified].float().mean() > 0.5
    assert (cert.radius.double()[flipped] <= distance[flipped]).all()


def test_tiny_net_certificates_agree_with_dense_grid():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    layers = convert_sequential(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)),
                                (2,))
    model = GloroNet(layers, (2,), 3)
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.3], [0.5, 0.8]])
    x_train = (centres.repeat(200, 1) + 0.12 * torch.randn(600, 2, generator=g)).clamp(0, 1)
    y_train = torch.arange(3).repeat(200)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        loss, _ = model.loss(x_train, y_train, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.converge()

    # Every point of a 601 x 601 grid over [0, 1]^2 with its class.
    ticks = torch.linspace(0, 1, 601)
    grid = torch.cartesian_prod(ticks, ticks)
    with torch.no_grad():
        grid_class = model(grid).argmax(1)
    x = torch.rand(300, 2, generator=g)
    for eps in (0.02, 0.05, 0.1):
        cert = model.certify(x, eps)
        assert cert.certified.float().mean() > 0.2
        # Distance from each point to the nearest grid point of another class: an upper bound
        # on its true distance to the decision boundary, so no sound radius may exceed it.
        nearest_other = torch.stack([
            torch.cdist(point.double().unsqueeze(0), grid[grid_class != c].double()).min()
            for point, c in zip(x, cert.pred, strict=True)])
        assert (cert.radius.double() <= nearest_other).all()
        assert (nearest_other[cert.certified] > eps).all()
        # PGD on the same points agrees with the grid.
        x_adv = PGD(model, eps, "l2", steps=40, restarts=4)(x, cert.pred)
        with torch.no_grad():
            flipped = model(x_adv).argmax(1) != cert.pred
        assert not flipped[cert.certified].any()
        clear = nearest_other < 0.9 * eps
        assert flipped[clear].all()
