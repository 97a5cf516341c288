"""GloRo: pairwise Lipschitz constants, the bottom logit, ties, the certificate contract,
input validation, the three losses, and exactness/soundness on a model computable by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certnet.archs import build_arch
from certnet.errors import ConfigError, InputError, UnsupportedLayerError
from certnet.methods.gloro import GAP_SLACK, GloroNet, bottom_logit, pairwise_lipschitz
from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import LipschitzLinear, trace_shapes

SHAPE = (1, 16, 16)


# -- helpers -----------------------------------------------------------------------------------
def small_net(loss: str = "ce", seed: int = 0, classes: int = 10) -> GloroNet:
    layers = build_arch("2c2f", SHAPE, classes, seed=seed)
    with torch.no_grad():  # spread the logits a little (orthogonal init gives tiny ones)
        layers[-1].weight.mul_(4.0)
        layers[-1].bias.normal_(0.0, 0.5)
    return GloroNet(layers, SHAPE, classes, loss=loss).eval()


def linear_net(weight: torch.Tensor, bias: torch.Tensor, input_shape: tuple[int, ...]
               ) -> GloroNet:
    """Body = Flatten only, head = the given linear layer: everything is computable by hand."""
    head = LipschitzLinear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    layers = nn.Sequential(nn.Flatten(), head)
    trace_shapes(layers, input_shape)
    return GloroNet(layers, input_shape, weight.shape[0]).eval()


def loop_pairwise(w: torch.Tensor, body: float) -> torch.Tensor:
    c = w.shape[0]
    k = torch.zeros(c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            k[i, j] = math.sqrt(sum((float(w[i, t]) - float(w[j, t])) ** 2
                                    for t in range(w.shape[1]))) * body
    return k


def loop_bottom(logits: torch.Tensor, k: torch.Tensor, eps: float,
                ref: list[int] | None = None) -> list[float]:
    out = []
    for b in range(logits.shape[0]):
        row = [float(v) for v in logits[b]]
        j = row.index(max(row)) if ref is None else ref[b]
        out.append(max(row[i] + eps * float(k[j, i]) for i in range(len(row)) if i != j))
    return out


# -- pairwise K and the bottom logit -----------------------------------------------------------
@pytest.mark.parametrize("classes,features", [(2, 1), (3, 5), (10, 7)])
def test_pairwise_lipschitz_matches_loop(classes, features):
    torch.manual_seed(classes)
    w = torch.randn(classes, features, dtype=torch.float64)
    body = torch.tensor(1.7, dtype=torch.float64)
    k = pairwise_lipschitz(w, body)
    assert k.shape == (classes, classes)
    assert torch.allclose(k, loop_pairwise(w, 1.7), rtol=1e-12, atol=0)
    assert torch.equal(k, k.T) and (k.diagonal() == 0).all()


@pytest.mark.parametrize("eps", [0.0, 0.1, 2.5])
def test_bottom_logit_matches_loop(eps):
    torch.manual_seed(1)
    w = torch.randn(6, 4, dtype=torch.float64)
    k = pairwise_lipschitz(w, torch.tensor(0.8, dtype=torch.float64))
    logits = torch.randn(20, 6, dtype=torch.float64)
    got = bottom_logit(logits, k, eps)
    assert torch.allclose(got, torch.tensor(loop_bottom(logits, k, eps), dtype=torch.float64))
    ref = torch.randint(0, 6, (20,))
    got = bottom_logit(logits, k, eps, ref)
    assert torch.allclose(got, torch.tensor(loop_bottom(logits, k, eps, ref.tolist()),
                                            dtype=torch.float64))


def test_bottom_logit_with_tied_top_is_at_least_the_top():
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0], [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, 0.0, -5.0]])
    w = torch.randn(4, 3)
    for k in (pairwise_lipschitz(w, torch.tensor(1.0)), torch.zeros(4, 4)):
        for eps in (0.0, 0.3):
            bot = bottom_logit(logits, k, eps)
            assert (bot >= logits.max(1).values).all()


def test_bottom_logit_single_class_is_minus_inf():
    bot = bottom_logit(torch.tensor([[0.3]]), torch.zeros(1, 1), 0.5)
    assert bot.item() == float("-inf")


# -- ties are never certified ------------------------------------------------------------------
def _tied_net() -> GloroNet:
    """Head rows 1 and 3 identical (weights and bias), with a large bias so they are on top."""
    torch.manual_seed(3)
    hidden = LipschitzLinear(8, 6)
    head = LipschitzLinear(6, 5)
    with torch.no_grad():
        head.weight[3] = head.weight[1]
        head.bias.zero_()
        head.bias[1] = head.bias[3] = 5.0
    layers = nn.Sequential(nn.Flatten(), hidden, MinMax(), head)
    trace_shapes(layers, (8,))
    return GloroNet(layers, (8,), 5).eval()


def test_duplicate_head_rows_are_never_certified():
    net = _tied_net()
    x = torch.rand(16, 8)
    logits = net(x)
    assert set(logits.argmax(1).tolist()) <= {1, 3}
    for eps in (0.0, 1e-6, 0.1, 1.0):
        cert = net.certify(x, eps)
        assert not cert.certified.any()
        assert (cert.radius == 0).all()
        assert set(cert.pred.tolist()) <= {1, 3}
    k = net.sound_lipschitz()
    assert k[1, 3] == 0
    logits64 = net.double()(x.double())
    if torch.equal(logits64[:, 1], logits64[:, 3]):  # exact tie in the float64 forward
        for eps in (0.0, 0.1):
            assert (bottom_logit(logits64, k, eps) >= logits64.max(1).values).all()


def test_exact_tie_between_distinct_rows_is_not_certified():
    """Logits tie exactly (K_01 > 0): the point is on the decision boundary, radius 0."""
    net = linear_net(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]),
                     torch.tensor([0.0, 0.0, -1.0]), (2,))
    x = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    cert = net.certify(x, 0.0)
    assert cert.certified.tolist() == [False, True]
    assert cert.radius[0] == 0
    assert cert.radius[1] == pytest.approx(0.5 / math.sqrt(2), rel=1e-4)


# -- the certificate contract ------------------------------------------------------------------
def test_certificate_contract():
    net = small_net()
    torch.manual_seed(5)
    x = torch.rand(48, *SHAPE)
    base = net.certify(x, 0.0)
    assert base.pred.dtype == torch.long and base.pred.shape == (48,)
    assert base.certified.dtype == torch.bool and base.certified.shape == (48,)
    assert base.radius.is_floating_point() and base.radius.shape == (48,)
    assert torch.equal(base.pred, net(x).argmax(1))
    assert base.certified.all()  # eps = 0 certifies everything without ties
    radius = base.radius.double()
    assert (radius > 0).all() and torch.isfinite(radius).all()
    quantiles = torch.quantile(radius, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    for eps in [1e-4, *quantiles.tolist(), float(radius.max()) * 1.01, 10.0]:
        cert = net.certify(x, eps)
        assert torch.equal(cert.pred, base.pred)
        assert torch.allclose(cert.radius, base.radius)
        clear = (radius - eps).abs() > 1e-6 * eps  # away from the rounding slack
        assert torch.equal(cert.certified[clear], (radius > eps)[clear])
    # every point is certified just below its radius and not just above it
    for i in range(0, 48, 6):
        r = float(radius[i])
        assert net.certify(x[i:i + 1], r * (1 - 1e-4)).certified.item()
        assert not net.certify(x[i:i + 1], r * (1 + 1e-4)).certified.item()


def test_radius_is_zero_where_not_certified_at_zero():
    net = linear_net(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                     torch.tensor([1.0, 0.0, 1.0]), (2,))  # classes 0 and 2 tie on top
    x = torch.rand(10, 2)
    cert = net.certify(x, 0.0)
    assert not cert.certified.any() and (cert.radius == 0).all()
    # and in general: not certified at 0 <=> radius 0
    net = small_net(seed=3)
    x = torch.rand(64, *SHAPE)
    with torch.no_grad():
        net.head.bias[4] = net.head.bias[7] = 50.0
        net.head.weight[7] = net.head.weight[4]
    cert = net.certify(torch.cat([x, torch.rand(64, *SHAPE)]), 0.0)
    assert not cert.certified.any()
    assert (cert.radius == 0).all()


def test_certified_points_resist_pgd():
    """Sanity: an l2 PGD attack (with restarts, not clipped to the pixel box, which the
    certificate does not need) never changes a prediction certified at eps."""
    net = small_net(seed=1)
    torch.manual_seed(6)
    x = torch.rand(32, *SHAPE)
    eps = float(net.certify(x, 0.0).radius.double().median())
    cert = net.certify(x, eps)
    assert 0 < cert.certified.sum() < 32
    xs = x[cert.certified].double()
    pred = cert.pred[cert.certified]
    f = net.double()
    for _ in range(3):
        delta = torch.randn_like(xs)
        delta = (eps * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).requires_grad_()
        for _ in range(30):
            logits = f(xs + delta)
            other = logits.scatter(1, pred.unsqueeze(1), float("-inf")).max(1).values
            margin = other - logits.gather(1, pred.unsqueeze(1)).squeeze(1)
            (grad,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                delta += 0.25 * eps * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(
                    -1, 1, 1, 1)
                norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                delta *= (eps / norm).clamp(max=1.0)
            with torch.no_grad():
                assert torch.equal(f(xs + delta).argmax(1), pred)


def test_sound_lipschitz_dominates_training_estimate():
    net = small_net(seed=2)
    net.converge()
    estimate = net.training_lipschitz().double()
    sound = net.sound_lipschitz()
    assert sound.dtype == torch.float64
    assert (sound >= estimate * (1 - 1e-5)).all()
    report = net.lipschitz_report()
    assert report["body_bound"] >= report["body_estimate"] * (1 - 1e-6)
    assert report["max_pairwise_bound"] >= report["max_pairwise_estimate"] * (1 - 1e-6)


# -- input validation --------------------------------------------------------------------------
@pytest.mark.parametrize("make_x", [
    lambda: torch.rand(2, 1, 15, 16),            # wrong spatial shape
    lambda: torch.rand(2, 3, 16, 16),            # wrong channels
    lambda: torch.rand(1, 16, 16),               # no batch dimension
    lambda: torch.rand(2, 1, 1, 16, 16),         # extra dimension
    lambda: torch.full((2, *SHAPE), float("nan")),
    lambda: torch.rand(2, *SHAPE).index_put_((torch.tensor([1]),), torch.tensor(float("inf"))),
    lambda: torch.rand(2, *SHAPE) - 0.5,         # below 0
    lambda: torch.rand(2, *SHAPE) + 0.5,         # above 1
    lambda: torch.rand(0, *SHAPE),               # empty batch
    lambda: torch.ones(2, *SHAPE, dtype=torch.long),
    lambda: torch.ones(2, *SHAPE, dtype=torch.uint8),
    lambda: torch.ones(2, *SHAPE, dtype=torch.bool),
    lambda: [[0.5] * 16] * 16,                   # not a tensor
], ids=["hw", "channels", "nobatch", "extradim", "nan", "inf", "neg", "above1", "empty",
        "long", "uint8", "bool", "list"])
def test_certify_rejects_bad_inputs(make_x):
    net = small_net()
    with pytest.raises(InputError):
        net.certify(make_x(), 0.1)


def test_certify_rejects_single_nan_pixel():
    x = torch.rand(3, *SHAPE)
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(InputError):
        small_net().certify(x, 0.1)


@pytest.mark.parametrize("eps", [-0.1, -1e-12, float("nan"), float("inf"), float("-inf"),
                                 "0.1", None])
def test_certify_rejects_bad_eps(eps):
    with pytest.raises(InputError):
        small_net().certify(torch.rand(2, *SHAPE), eps)


def test_certify_accepts_edge_inputs():
    net = small_net()
    for x in (torch.zeros(1, *SHAPE), torch.ones(1, *SHAPE), torch.rand(2, *SHAPE).double()):
        cert = net.certify(x, 0)
        assert cert.pred.shape == (x.shape[0],)


def test_unknown_certifier_raises_config_error():
    with pytest.raises(ConfigError, match="unknown certifier"):
        small_net().certify(torch.rand(2, *SHAPE), 0.1, certifier="no-such-certifier")


# -- construction ------------------------------------------------------------------------------
def test_constructor_validation():
    layers = build_arch("2c2f", SHAPE, 10, seed=0)
    with pytest.raises(ConfigError):
        GloroNet(layers, SHAPE, 10, loss="hinge")
    with pytest.raises(ConfigError):
        GloroNet(layers, SHAPE, 9)  # head has 10 outputs
    with pytest.raises(ConfigError):
        GloroNet(layers[:-1], SHAPE, 10)  # does not end in a linear layer
    bad = nn.Sequential(nn.Flatten(), LipschitzLinear(4, 6), nn.Tanh(), LipschitzLinear(6, 3))
    with pytest.raises(UnsupportedLayerError):
        GloroNet(bad, (4,), 3)


# -- losses ------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["ce", "trades", "emma"])
@pytest.mark.parametrize("eps", [0.0, 0.3, 1.58])
def test_losses_are_finite_with_gradients_for_all_weights(loss_name, eps):
    net = small_net(loss_name).train()
    torch.manual_seed(7)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    loss, stats = net.loss(x, y, eps, trades_lambda=1.5)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert stats["clean"].shape == stats["robust"].shape == (16,)
    assert not (stats["robust"] & ~stats["clean"]).any()  # robust implies clean


def _reference_k(net: GloroNet) -> torch.Tensor:
    """K as the last loss call saw it (power iteration already advanced its iterates)."""
    return pairwise_lipschitz(net.head.weight, net.body_estimate(0)).detach()


def test_ce_loss_at_eps_zero_is_ce_on_logits_and_runner_up():
    """eps = 0: y_bot = max over i != argmax of y_i, the runner-up logit (the top logit again
    when it is tied), so the loss is CE over [y_1..y_C, runner-up]."""
    net = small_net("ce")
    torch.manual_seed(8)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    loss, _ = net.loss(x, y, 0.0)
    logits = net(x).detach()
    runner_up = logits.sort(1, descending=True).values[:, 1]
    expected = F.cross_entropy(torch.cat([logits, runner_up.unsqueeze(1)], 1), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _loss_and_rows(loss_name: str, seed: int, eps: float):
    """The loss of a small net on 8 random points, with its logits (as lists), labels and K."""
    net = small_net(loss_name)
    torch.manual_seed(seed)
    x, y = torch.rand(8, *SHAPE), torch.randint(0, 10, (8,))
    loss, _ = net.loss(x, y, eps)
    rows = net(x).detach().tolist()
    return loss.item(), rows, y.tolist(), _reference_k(net)


def _cross_entropy(row: list[float], label: int) -> float:
    return -row[label] + math.log(sum(math.exp(v) for v in row))


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_ce_loss_matches_loop(eps):
    loss, rows, labels, k = _loss_and_rows("ce", 9, eps)
    total = 0.0
    for row, label in zip(rows, labels, strict=True):
        j = row.index(max(row))
        bot = max(row[i] + eps * float(k[j, i]) for i in range(10) if i != j)
        total += _cross_entropy(row + [bot], label)
    assert loss == pytest.approx(total / 8, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_trades_loss_decomposes(eps):
    """KL(softmax(y) + [0] || softmax([y, y_bot])) = log Z' - log Z, so with lambda = 1 the
    TRADES loss equals the 'ce' loss, and in general CE(clean) + lambda * (ce - CE(clean))."""
    torch.manual_seed(10)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    net = small_net("trades")
    state = copy.deepcopy(net.state_dict())  # the power iterates advance at every loss call
    net.loss_name = "ce"
    ce_loss = net.loss(x, y, eps)[0].item()
    clean = F.cross_entropy(net(x), y).item()
    net.loss_name = "trades"
    for lam in (0.0, 1.0, 3.0):
        net.load_state_dict(state)
        value, _ = net.loss(x, y, eps, trades_lambda=lam)
        expected = clean + lam * (ce_loss - clean)
        assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_emma_loss_at_eps_zero_is_plain_ce():
    net = small_net("emma")
    torch.manual_seed(11)
    x, y = torch.rand(16, *SHAPE), torch.randint(0, 10, (16,))
    loss, _ = net.loss(x, y, 0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_emma_loss_matches_loop(eps):
    loss, rows, labels, k = _loss_and_rows("emma", 12, eps)
    total = 0.0
    for row, t in zip(rows, labels, strict=True):
        shifted = []
        for i in range(10):
            if i == t:
                shifted.append(row[t])
                continue
            scale = min(max((row[t] - row[i]) / (eps * float(k[t, i])), 0.01), 1.0)
            shifted.append(row[i] + eps * scale * float(k[t, i]))
        total += _cross_entropy(shifted, t)
    assert loss == pytest.approx(total / 8, rel=1e-5)


def test_unknown_loss_name_raises():
    with pytest.raises(ConfigError):
        small_net("margin")


def test_trades_gradients_finite_with_a_confidently_rejected_class():
    head = LipschitzLinear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.0, 0.0, -110.0]))
    layers = nn.Sequential(nn.Flatten(), head)
    net = GloroNet(layers, (2,), 3, loss="trades")
    loss, _ = net.loss(torch.tensor([[0.6, 0.4]]), torch.tensor([0]), 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# -- exactness and soundness on a model computable by hand -------------------------------------
def test_radius_of_hand_computed_linear_model():
    """Body = Flatten (Lipschitz 1), head = identity on 4 pixels: logits = x, so
    K_ij = sqrt(2) and the radius is (x_top - x_second) / sqrt(2)."""
    net = linear_net(torch.eye(4), torch.zeros(4), (1, 2, 2))
    x = torch.tensor([[0.9, 0.5, 0.2, 0.1], [0.3, 0.35, 1.0, 0.0]]).view(2, 1, 2, 2)
    cert = net.certify(x, 0.0)
    assert cert.pred.tolist() == [0, 2]
    expected = torch.tensor([0.4, 0.65], dtype=torch.float64) / math.sqrt(2)
    assert torch.allclose(cert.radius.double(), expected, rtol=1e-4)
    assert (cert.radius.double() <= expected).all()  # the slack only ever shrinks it
    assert float(net.body_bound()) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_radius_is_margin_over_k_and_tight_for_a_linear_model(seed):
    g = torch.Generator().manual_seed(seed)
    classes, shape = 5, (1, 3, 3)
    weight = torch.randn(classes, 9, generator=g) * 0.5
    bias = torch.randn(classes, generator=g) * 0.1
    net = linear_net(weight, bias, shape)
    x = 0.25 + 0.5 * torch.rand(8, *shape, generator=g)
    cert = net.certify(x, 0.0)
    w64, b64 = weight.double(), bias.double()
    logits = x.double().flatten(1) @ w64.T + b64
    for n in range(x.shape[0]):
        j = int(logits[n].argmax())
        assert int(cert.pred[n]) == j
        ratios = {i: float((logits[n, j] - logits[n, i]) / (w64[j] - w64[i]).norm())
                  for i in range(classes) if i != j}
        i_min = min(ratios, key=ratios.get)
        r = ratios[i_min]
        slack = GAP_SLACK * (1 + abs(float(logits[n, j])) + abs(float(logits[n, i_min])))
        slack /= float((w64[j] - w64[i_min]).norm())
        got = float(cert.radius[n])
        assert got <= r * (1 + 1e-6)  # sound (float32 rounding of the reported radius aside)
        assert got == pytest.approx(r - slack, rel=1e-5)  # exactly margin / K, less the slack
        # the worst direction: slightly more than the radius flips, slightly less does not
        d = (w64[i_min] - w64[j]) / (w64[i_min] - w64[j]).norm()
        xn = x[n].double().flatten()
        for factor, flips in ((1 + 1e-3, True), (1 - 1e-3, False)):
            moved = (xn + factor * r * d).view(1, *shape)
            assert (int(net.double()(moved).argmax(1)) != j) == flips
            net.float()
        assert net.certify(x[n:n + 1], got * (1 - 1e-4)).certified.item()
        assert not net.certify(x[n:n + 1], r * (1 + 1e-4)).certified.item()


def test_sound_constants_are_cached_until_any_weight_or_attribute_changes():
    net = small_net("ce")
    first = net.sound_lipschitz()
    assert net.sound_lipschitz() is first  # unchanged weights: computed once
    net.layers[0].weight.data.mul_(2.0)  # .data: no autograd version bump, still detected
    second = net.sound_lipschitz()
    assert second.max() > first.max()
    net.layers[0].stride = (1, 1)  # an attribute the bound depends on
    with pytest.raises(InputError):  # ... and the traced shape no longer fits the forward
        net.certify(torch.rand(2, *SHAPE), 0.1)
    net.layers[0].stride = (2, 2)
    assert torch.equal(net.sound_lipschitz(), second)
    net.layers[0].power_iterate.mul_(-1)  # estimate-only state does not invalidate the cache
    assert net.sound_lipschitz() is net.sound_lipschitz()


def test_weights_changed_between_certify_calls_are_never_certified_with_stale_bounds():
    net = small_net("ce", seed=2)
    x = torch.rand(64, *SHAPE)
    eps = float(net.certify(x, 0.0).radius.double().median())
    before = net.certify(x, eps)
    with torch.no_grad():
        net.layers[0].weight.mul_(50.0)  # a far larger Lipschitz constant
    fresh = copy.deepcopy(net)
    fresh._twin = None
    after, expected = net.certify(x, eps), fresh.certify(x, eps)
    assert torch.equal(after.certified, expected.certified)
    assert torch.equal(after.radius, expected.radius)
    assert after.certified.sum() < before.certified.sum()


def test_from_sequential_round_trips_through_a_checkpoint(tmp_path):
    import certnet

    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3))
    shape = (1, 28, 28)
    net = GloroNet.from_sequential(seq, shape).eval()
    x = torch.rand(5, *shape)
    assert torch.allclose(net(x), seq(x), atol=1e-6) and net.num_classes == 3
    certnet.save_model(tmp_path / "m", net)
    loaded = certnet.load(tmp_path / "m")
    assert torch.equal(loaded.certify(x, 0.1).certified, net.certify(x, 0.1).certified)
    with pytest.raises(UnsupportedLayerError):
        GloroNet.from_sequential(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Tanh(),
                                                     torch.nn.Linear(784, 3)), shape)
