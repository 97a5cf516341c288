"""l_inf-dist nets: layers, bound rules, the l_inf Lipschitz certificate against the exact oracle,
the method's schedule and loss, and the train -> checkpoint -> certify path."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from nets import linf_dist_as_relu
from torch import nn

from certnet.archs import build_arch
from certnet.bounds import margin_bounds
from certnet.bounds.rules import LayerInput, rule_for
from certnet.bounds.rules.linf_dist import dist_interval
from certnet.certifiers import applicable, certify
from certnet.certifiers.linf_lipschitz import lower_gaps
from certnet.checkpoint import load, save_model
from certnet.config import TrainConfig
from certnet.errors import ConfigError, InputError
from certnet.methods.linf_dist import LinfDistNet
from certnet.nn.integrity import Float64Twin
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate, identity_init
from certnet.nn.linf_dist_kernels import linf_dist_reference
from certnet.nn.spec import build_layers, describe_layers
from certnet.threat import ThreatModel
from certnet.train import build_optimizer, train
from certnet.verify import exact_min_margin

P_VALUES = (1.0, 2.0, 8.0, math.inf)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def net(seed: int, d: int, depth: int, width: int, classes: int, shift: float = 1.0
        ) -> LinfDistNet:
    """A random eval-mode l_inf-dist MLP over ``d`` inputs with random running means."""
    layers = build_arch("linf-dist-mlp", (d,), classes, seed=seed, init="linf-dist",
                        depth=depth, width=width)
    with torch.no_grad():
        for m in layers:
            if type(m) is MeanShift:
                m.running_mean.uniform_(-shift, shift, generator=gen(seed + 1))
            if type(m) is LinfDist:
                m.weight.uniform_(-1, 2, generator=gen(seed + 2))
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=gen(seed + 3))
    return LinfDistNet(layers, (d,), classes).eval()


# -- layers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", P_VALUES)
def test_dense_and_conv_layers_compute_the_distance(p):
    g = gen(0)
    layer = LinfDist(7, 5, p=p, bias=True)
    x = torch.randn(4, 7, generator=g)
    expected = linf_dist_reference(x, layer.weight, p) + layer.bias
    torch.testing.assert_close(layer(x), expected)
    conv = LinfDistConv2d(3, 4, kernel_size=3, stride=2, padding=1, p=p)
    img = torch.randn(2, 3, 7, 6, generator=g)
    out = conv(img)
    assert out.shape == (2, 4, 4, 3)
    padded = F.pad(img, (1, 1, 1, 1))
    for i, j in [(0, 0), (1, 2), (3, 1)]:
        patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(2, -1)
        diff = (patch[:, None, :] - conv.weight[None]).abs()
        ref = diff.amax(-1) if math.isinf(p) else diff.pow(p).sum(-1) ** (1 / p)
        torch.testing.assert_close(out[:, :, i, j], ref)


def test_layers_refuse_bad_shapes_and_settings():
    with pytest.raises(InputError, match="expects"):
        LinfDist(4, 2)(torch.zeros(3, 5))
    with pytest.raises(InputError, match="expects"):
        LinfDistConv2d(2, 2, 3)(torch.zeros(1, 3, 5, 5))
    for p in (0.5, "nan", "x", None):
        with pytest.raises(ConfigError, match="p must be"):
            LinfDist(2, 2, p=p)
    with pytest.raises(ConfigError):
        LinfDist(0, 2)


def test_mean_shift_subtracts_the_batch_mean_in_training_and_the_running_mean_after():
    m = MeanShift(3, momentum=0.5)
    x = torch.randn(8, 3, 4, 4, generator=gen(1)) + 2
    y = m(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.running_mean, 0.5 * x.mean((0, 2, 3)))
    m.eval()
    torch.testing.assert_close(m(x), x - m.running_mean.view(1, 3, 1, 1))


def test_identity_init_makes_hidden_layers_an_identity_plus_a_constant():
    layer = LinfDist(6, 8, p=math.inf)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1, generator=gen(2))
    identity_init(layer)
    x = torch.rand(5, 6, generator=gen(3))
    torch.testing.assert_close(layer(x), x[:, torch.arange(8) % 6] + 10)
    wide_in = LinfDist(8, 6)
    before = wide_in.weight.clone()
    identity_init(wide_in)  # more inputs than outputs: left alone (as in the reference)
    assert torch.equal(wide_in.weight, before)


@pytest.mark.parametrize("p", [8.0, math.inf])
def test_specs_round_trip_with_p(p):
    layers = nn.Sequential(LinfDistConv2d(1, 4, 3, stride=2, padding=1, p=p), MeanShift(4),
                           nn.Flatten(), LinfDist(4 * 14 * 14, 10, p=p, bias=True), Negate())
    specs = describe_layers(layers)
    json.dumps(specs, allow_nan=False)  # inf is stored as the string "inf"
    rebuilt = build_layers(json.loads(json.dumps(specs)), (1, 28, 28))
    assert [m.p for m in rebuilt if hasattr(m, "p")] == [p, p]
    rebuilt.load_state_dict(layers.state_dict())
    x = torch.rand(2, 1, 28, 28, generator=gen(4))
    layers.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), layers(x))


# -- bound rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", P_VALUES)
def test_distance_interval_contains_every_point_and_is_attained(p):
    g = gen(5)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    lo = torch.randn(4, 5, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(4, 5, generator=g, dtype=torch.float64) * torch.tensor([0, 1, 2, 3, 4])
    lower, upper = dist_interval(lo, hi, w, p)
    pts = lo[:, None] + (hi - lo)[:, None] * torch.rand(4, 200, 5, generator=g,
                                                        dtype=torch.float64)
    vals = linf_dist_reference(pts.reshape(-1, 5), w, p).view(4, 200, 6)
    assert (vals >= lower[:, None] - 1e-12).all() and (vals <= upper[:, None] + 1e-12).all()
    # attained: the nearest point of the box to w_o and the farthest vertex
    for o in range(6):
        near = torch.maximum(torch.minimum(w[o].expand_as(lo), hi), lo)
        far = torch.where((lo - w[o]).abs() > (hi - w[o]).abs(), lo, hi)
        torch.testing.assert_close(linf_dist_reference(near, w[o:o + 1], p)[:, 0], lower[:, o])
        torch.testing.assert_close(linf_dist_reference(far, w[o:o + 1], p)[:, 0], upper[:, o])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_interval_kernel_and_the_chunked_torch_path_agree_exactly(monkeypatch, dtype):
    """p = inf: the numba interval kernel equals the portable path bit for bit, and the
    portable path does not depend on its chunk size."""
    import certnet.bounds.rules.linf_dist as rules

    pytest.importorskip("numba")
    g = gen(6)
    w, lo = torch.randn(9, 7, generator=g, dtype=dtype), torch.randn(5, 7, generator=g,
                                                                    dtype=dtype)
    hi = lo + torch.rand(5, 7, generator=g, dtype=dtype) * (torch.rand(5, 7, generator=g) > 0.2)
    fast = dist_interval(lo, hi, w, math.inf)
    monkeypatch.setattr(rules, "linf_dist_interval", lambda *args: None)
    whole = dist_interval(lo, hi, w, math.inf)
    monkeypatch.setattr(rules, "CHUNK_ELEMENTS", 10)
    for a, b, c in zip(fast, whole, dist_interval(lo, hi, w, math.inf), strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
    lo[0, 3] = float("nan")  # NaN propagates, never silently skipped
    monkeypatch.undo()
    lower, upper = dist_interval(lo, hi, w, math.inf)
    assert torch.isnan(lower[0]).all() and torch.isnan(upper[0]).all()


@pytest.mark.parametrize("layer", [
    LinfDistConv2d(2, 3, 3, stride=1, padding=1, p=math.inf, bias=True), MeanShift(2),
    Negate(), nn.Tanh()], ids=["conv", "mean-shift", "negate", "tanh"])
def test_rules_contain_the_layer_outputs(layer):
    g = gen(7)
    lo = torch.randn(2, 2, 5, 5, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(2, 2, 5, 5, generator=g, dtype=torch.float64)
    layer = layer.double().eval()
    if type(layer) is MeanShift:
        layer.running_mean.uniform_(-1, 1, generator=g)
    lower, upper = rule_for(layer).interval(layer, LayerInput(lo, hi, lo))
    for _ in range(50):
        x = lo + (hi - lo) * torch.rand(lo.shape, generator=g, dtype=torch.float64)
        y = layer(x)
        assert (y >= lower - 1e-12).all() and (y <= upper + 1e-12).all()


def test_backward_passes_stop_at_the_distance_layers():
    """No linear relaxation of the distance layers: CROWN-style bounds of a pure l_inf-dist net
    concretize on the last distance layer's interval, i.e. equal IBP's."""
    model = net(8, 3, 3, 4, 3)
    x = torch.rand(5, 3, generator=gen(9), dtype=torch.float64)
    layers = model.layers.double()
    ref = layers(x).argmax(1)
    threat = ThreatModel("linf", 0.05)
    ibp = margin_bounds(layers, x, threat, ref, "ibp")
    for method in ("crown-ibp", "crown"):
        torch.testing.assert_close(margin_bounds(layers, x, threat, ref, method), ibp)


# -- certificates against the exact oracle --------------------------------------------------------
def exact(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float, norm: str,
          **kwargs) -> float:
    """The oracle's exact minimum margin; HiGHS sometimes reports a numerical solve error on
    the degenerate max-trees of these rewritten nets, and exact enumeration answers those."""
    try:
        return exact_min_margin(layers, x, label, eps, norm, **kwargs)
    except RuntimeError:
        return exact_min_margin(layers, x, label, eps, norm, method="enumerate", **kwargs)


#: certifiers whose certificates carry a lower bound on the margin over the ball
MARGINS = ("linf-lipschitz", "ibp", "crown-ibp", "crown", "alpha-crown")


def check_against_oracle(model: LinfDistNet, relu_net: nn.Sequential, x: torch.Tensor,
                         norms: tuple[str, ...], counts: dict[str, int], where: str,
                         radii: tuple[float, ...] = (0.02, 0.1, 0.3)) -> None:
    """Certified => robust, margins never above the exact minimum margin, the linf-lipschitz
    radius robust, for every applicable certifier and best at each radius; counts what was
    checked."""
    for eps in radii:
        for norm in norms:
            names = [*applicable(model, norm), "best"]
            assert "linf-lipschitz" in names and "ibp" in names
            certs = {name: certify(model, x, eps, name, norm) for name in names}
            for i in range(len(x)):
                label = int(certs["best"].pred[i])
                m_star = exact(relu_net, x[i], label, eps, norm)
                counts["cases"] += 1
                counts["not_robust"] += m_star <= 0
                for name, cert in certs.items():
                    counts[name] = counts.get(name, 0) + bool(cert.certified[i])
                    assert not (bool(cert.certified[i]) and m_star <= 0), (name, where, eps)
                    assert cert.margin is not None or name not in MARGINS, name
                    if cert.margin is not None:
                        assert float(cert.margin[i]) <= m_star + 1e-9 * (1 + abs(m_star)), \
                            (name, where, eps, norm)
                r = float(certs["linf-lipschitz"].radius[i]) * (1 - 1e-6)
                if r > 0:
                    counts["radius_checks"] += 1
                    assert exact(relu_net, x[i], label, r, norm, domain=None) > 0, (where, r)


def assert_not_vacuous(counts: dict[str, int]) -> None:
    n = counts["cases"]
    assert counts["not_robust"] >= 0.1 * n, counts
    for name in ("linf-lipschitz", "ibp", "best"):
        assert counts[name] >= 0.1 * n, counts
    assert counts["radius_checks"] >= 0.1 * n, counts


@pytest.mark.parametrize("nets", [10, pytest.param(60, marks=pytest.mark.slow, id="60-slow")])
def test_certificates_never_contradict_the_exact_oracle(nets):
    """Tiny random l_inf-dist nets at p = inf, rewritten exactly as ReLU networks for the oracle:
    certified => robust, margins never above the exact minimum margin, the linf-lipschitz
    radius is robust; not vacuous (some points certified, some not robust)."""
    counts = {"cases": 0, "not_robust": 0, "radius_checks": 0}
    for seed in range(nets):
        d, depth, width, classes = 2 + seed % 2, 2 + seed % 3 // 2, 2 + seed % 2, 2 + seed % 3
        model = net(seed, d, depth, width, classes)
        relu_net = linf_dist_as_relu(model.layers, d)
        x = torch.rand(2, d, generator=gen(100 + seed))
        torch.testing.assert_close(relu_net(x.double()), model.layers.double()(x.double()))
        model.float()
        check_against_oracle(model, relu_net, x, ("linf", "l2") if d == 2 else ("linf",),
                             counts, f"seed {seed}")
    print(f"\nl_inf-dist certificates vs exact oracle: {counts}")
    assert_not_vacuous(counts)


def conv_net(seed: int, classes: int, stride: int) -> LinfDistNet:
    """A random eval-mode conv l_inf-dist net on 1 x 2 x 2 inputs: a zero-padded distance
    convolution (kernel 2), a mean shift, a dense distance layer with bias, logits = -u."""
    conv = LinfDistConv2d(1, 2, 2, stride=stride, padding=1)
    h = conv.output_size(2, 2)
    layers = nn.Sequential(conv, MeanShift(2), nn.Flatten(),
                           LinfDist(2 * h[0] * h[1], classes, bias=True), Negate())
    with torch.no_grad():
        conv.weight.uniform_(-1, 2, generator=gen(seed))
        layers[1].running_mean.uniform_(0, 1, generator=gen(seed + 1))
        layers[3].weight.uniform_(0, 1, generator=gen(seed + 2))  # close logits: boundaries
        layers[3].bias.uniform_(-0.1, 0.1, generator=gen(seed + 3))  # inside the balls
    return LinfDistNet(layers, (1, 2, 2), classes).eval()


@pytest.mark.parametrize("nets", [8, pytest.param(40, marks=pytest.mark.slow, id="40-slow")])
def test_conv_certificates_never_contradict_the_exact_oracle(nets):
    """The same on conv l_inf-dist nets (zero padding read as constant patch entries), in
    l_inf: the l2 enumeration of their rewritten max-trees takes minutes."""
    counts = {"cases": 0, "not_robust": 0, "radius_checks": 0}
    for seed in range(nets):
        model = conv_net(seed, 2 + seed % 2, 1 + seed % 2)
        relu_net = linf_dist_as_relu(model.layers, (1, 2, 2))
        x = torch.rand(2, 1, 2, 2, generator=gen(200 + seed))
        torch.testing.assert_close(relu_net(x.double()), model.layers.double()(x.double()))
        model.float()
        check_against_oracle(model, relu_net, x, ("linf",), counts, f"seed {seed}",
                             radii=(0.05, 0.3, 0.6))
    print(f"\nconv l_inf-dist certificates vs exact oracle: {counts}")
    assert_not_vacuous(counts)


def test_best_takes_the_tighter_of_margin_and_intervals():
    model = net(3, 3, 3, 6, 3)
    x = torch.rand(64, 3, generator=gen(11))
    certs = {name: certify(model, x, 0.1, name) for name in ("linf-lipschitz", "ibp", "best")}
    union = certs["linf-lipschitz"].certified | certs["ibp"].certified
    assert torch.equal(certs["best"].certified, union)
    # the interval bound uses the [0, 1] box, so it proves points the margin alone does not
    # (at eps 0.1 it does here: "best" is more than the margin certificate)
    assert (certs["ibp"].certified & ~certs["linf-lipschitz"].certified).any()
    assert certs["best"].certified.sum() > certs["linf-lipschitz"].certified.sum()


def test_finite_p_margin_certificate_uses_the_norm_inequality():
    """At finite p a distance layer is n^(1/p)-Lipschitz in l_inf: the radius shrinks by that
    factor and stays sound against dense sampling of the ball's vertices."""
    model = net(12, 4, 2, 4, 3)
    x = torch.rand(8, 4, generator=gen(13))
    r_inf = certify(model, x, 0.01, "linf-lipschitz").radius
    for m in model.layers:
        if hasattr(m, "p"):
            m.p = 8.0
    cert = certify(model, x, 0.01, "linf-lipschitz")
    pred = cert.pred
    assert (cert.radius > 0).any()
    signs = torch.tensor([[(k >> j) & 1 for j in range(4)] for k in range(16)]) * 2.0 - 1
    with torch.no_grad():
        for i in range(len(x)):
            r = float(cert.radius[i])
            pts = x[i] + r * (1 - 1e-6) * signs
            logits = model.layers.double()(pts.double())
            assert (logits.argmax(1) == pred[i]).all() or r == 0
    # radius = min_j (z_pred - z_j) / (2 L) with L the product of the layers' n^(1/p) (the
    # Flatten, MeanShift and Negate layers are 1-Lipschitz): the p = inf radius (L = 1) shrunk
    lip = math.prod(m.weight.shape[1] ** (1 / m.p) for m in model.layers if hasattr(m, "p"))
    with torch.no_grad():
        z = model.layers(x.double())
    model.float()
    gaps = z.gather(1, pred[:, None]) - z
    gaps[torch.arange(len(x)), pred] = math.inf
    expected = gaps.amin(1).clamp_min(0) / (2 * lip)
    assert lip > 1.3 and r_inf.shape == cert.radius.shape
    assert (cert.radius.double() <= expected).all()
    assert (cert.radius.double() >= expected * (1 - 1e-5)).all()


# -- the method -------------------------------------------------------------------------------
def test_p_schedule_holds_grows_by_powers_of_two_and_ends_at_inf():
    model = net(0, 4, 3, 8, 3)
    model.p_ramp = type(model.p_ramp)(8.0, 1000.0, 0.1, 0.9, "exp")
    assert model.p_at(0.05) == 8.0
    grown = [model.p_at(t) for t in (0.2, 0.4, 0.6, 0.8)]
    assert all(math.log2(p).is_integer() for p in grown) and grown == sorted(grown)
    assert model.p_at(0.9) == math.inf
    assert model.on_progress(0.5) == {"p": model.p_at(0.5)}
    assert model.on_progress(0.95) == {"p": "inf"}
    model.on_progress(0.5)
    assert {m.p for m in model.layers if hasattr(m, "p")} == {model.p_at(0.5)}
    model.p_pow2 = False
    assert not math.log2(model.p_at(0.3)).is_integer()


def test_training_margins_of_the_pure_net_are_the_lipschitz_bound():
    model = net(1, 4, 3, 8, 5).train()
    x = torch.rand(6, 4, generator=gen(14))
    y = torch.randint(0, 5, (6,), generator=gen(15))
    lower, logits = model.training_margins(x, y, 0.1)
    others = torch.ones(6, 5, dtype=torch.bool).scatter(1, y[:, None], False)
    expected = (logits.gather(1, y[:, None]) - logits)[others].view(6, 4) - 0.2
    torch.testing.assert_close(lower, expected)
    loss, stats = model.loss(x, y, 0.1, lam=0.1)
    loss.backward()
    assert model.scale.grad is not None and set(stats) == {"clean", "robust"}


def test_the_hinge_is_zero_when_certified_at_the_training_eps_and_one_when_misclassified():
    """v2's clipped hinge (the reference's clamp((o_j - o_y) / 2 eps + 1, 0, 1))."""
    model = net(5, 4, 3, 8, 5).eval()
    x = torch.rand(16, 4, generator=gen(19))
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, 1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    eps = float(margin.min()) / (2 * model.body_lipschitz()) * 0.99
    loss, stats = model.loss(x, top2.indices[:, 0], eps)
    assert float(loss.detach()) == 0 and stats["robust"].all()
    loss, stats = model.loss(x, logits.argmin(1), eps)  # the worst class: margin <= 0
    assert float(loss.detach()) == 1 and not stats["robust"].any()
    half = float(margin[0]) / model.body_lipschitz()  # theta = 2 * clean margin
    loss, _ = model.loss(x[:1], top2.indices[:1, 0], half)
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_the_output_scale_learns_at_its_own_rate():
    model = net(2, 4, 3, 8, 3)
    config = TrainConfig(method="linf-dist", arch="linf-dist-mlp", lr=0.03,
                         arch_kwargs={"depth": 3, "width": 8})
    groups = build_optimizer(config, model).param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 0.2]
    assert groups[1]["params"] == [model.scale]


def test_hybrid_net_is_certified_through_its_head():
    layers = build_arch("linf-dist-hybrid", (1, 6, 6), 3, seed=0, init="linf-dist", depth=4,
                        width=8, hidden=6, activation="relu")
    model = LinfDistNet(layers, (1, 6, 6), 3).eval()
    x = torch.rand(4, 1, 6, 6, generator=gen(16))
    assert "linf-lipschitz" in applicable(model, "linf")  # the linear head's l1 rows bound it
    for name in ("ibp", "crown-ibp", "crown", "best"):
        assert certify(model, x, 0.001, name).pred.shape == (4,)
    y = torch.randint(0, 3, (4,), generator=gen(17))
    model.train()
    lower, _ = model.training_margins(x, y, 0.01)
    assert lower.shape == (4, 2)


def test_train_save_load_certify(tmp_path, mnist_available):
    config = TrainConfig(method="linf-dist", arch="linf-dist-mlp", dataset="mnist", eps=0.1,
                         eps_train_factor=1.5, epochs=2, batch_size=64, lr=0.01,
                         arch_kwargs={"depth": 3, "width": 32,
                                      "normalize": [[0.1307], [0.3081]]},
                         method_kwargs={"p_begin": 0.25, "p_finish": 0.75},
                         loss_schedules={"lam": 0.05}, train_limit=256, eval_limit=64,
                         eval_every=1)
    train(config, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["p"] for r in lines] == [32.0, "inf"]
    assert 0 <= lines[-1]["test_vra"] <= lines[-1]["test_clean"] <= 1
    model = load(tmp_path / "run")
    assert type(model) is LinfDistNet
    assert {m.p for m in model.layers if hasattr(m, "p")} == {math.inf}
    x = torch.rand(3, 1, 28, 28, generator=gen(18))
    cert = certify(model, x, 0.1)
    assert cert.by is not None
    save_model(tmp_path / "copy", model)
    again = load(tmp_path / "copy")
    assert torch.equal(again.scale, model.scale)


def test_from_the_cli(tmp_path, mnist_available, capsys):
    from certnet.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--method", "linf-dist", "--arch", "linf-dist-mlp", "--arch-arg",
                 "depth=3", "--arch-arg", "width=16", "--method-arg", "p_finish=0.5",
                 "--epochs", "1", "--batch-size", "64", "--train-limit", "128",
                 "--eval-limit", "32", "--out", str(out), "--quiet"]) == 0
    assert load(out).layers[1].out_features == 16
    assert main(["certify", str(out), "--certifier", "linf-lipschitz", "--limit", "16"]) == 0
    assert "linf-lipschitz" in capsys.readouterr().out


# -- the linf-lipschitz certifier at the edges of float64 ------------------------------------------
class Chain:
    """A plain network as certifiers see it (:class:`certnet.certifiers.base.Certifiable`)."""

    method, norm, default_certifier, slope = "chain", "linf", "linf-lipschitz", "adaptive"

    def __init__(self, layers: nn.Sequential, shape: tuple[int, ...], classes: int) -> None:
        self.layers, self.input_shape, self.num_classes = layers, shape, classes

    def float64_copy(self, key, derive):
        return Float64Twin(self.layers, derive)


def dense(weight: list[list[float]], bias: list[float]) -> nn.Sequential:
    layer = nn.Linear(len(weight[0]), len(weight)).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return nn.Sequential(layer)


def test_overflowing_logits_certify_nothing():
    """At x = 0.9 the float64 logits are (inf, 1.07e308): the margin is NaN after the drift,
    and read as robust it would certify class 0 at eps 0.49, where at x' = 0.41 the exact
    logits are (1.428e308, 1.462e308). With 2 L above the largest float (inf / inf) the
    radius is 0, not NaN."""
    model = Chain(dense([[0.8e308], [-0.8e308]], [1.1e308, 1.79e308]), (1,), 2)
    x = torch.tensor([[0.9]], dtype=torch.float64)
    with torch.no_grad():
        assert model.layers(x)[0, 0] == math.inf
        inside = model.layers(torch.tensor([[0.41]], dtype=torch.float64))[0]
    assert inside[1] > inside[0]  # exactly too: both are sums of two exact terms, far apart
    cert = certify(model, x, 0.49, "linf-lipschitz")
    assert not cert.certified.any() and cert.radius.eq(0).all() and cert.margin[0] == -math.inf
    wide = Chain(dense([[1.7e308], [-0.5e308]], [0.2e308, 1.7e308]), (1,), 2)
    cert = certify(wide, torch.tensor([[0.95]], dtype=torch.float64), 0.01, "linf-lipschitz")
    assert not cert.certified.any() and cert.radius.eq(0).all()


def test_one_output_certifies_nothing_and_two_outputs_do():
    """With one output there is no other class to beat: nothing is certified (read as an
    empty minimum, every radius would be infinite)."""
    x = torch.rand(3, 2, generator=gen(30), dtype=torch.float64)
    one = certify(Chain(dense([[0.3, -0.2]], [0.1]), (2,), 1), x, 0.01, "linf-lipschitz")
    assert not one.certified.any() and one.radius.eq(0).all()
    two = certify(Chain(dense([[0.3, -0.2], [-0.3, 0.2]], [5.0, 0.0]), (2,), 2), x, 0.01,
                  "linf-lipschitz")
    assert two.certified.all() and (two.radius > 0.01).all()


def test_lower_gaps_are_below_the_exact_gaps():
    """top - logits - spread rounded down, against exact rationals: spreads far below, equal
    to and far above the logits, subnormal and huge magnitudes, near-cancelling logits."""
    generator = gen(31)
    scales = [(1, 1, 1e-13), (1, 1, 1), (1, 1e-3, 10), (1e-3, 1, 10), (1, 1, 1e3),
              (1e300, 1e300, 1e301), (1e-300, 1e-300, 1e-299), (1, 1 - 2**-52, 3),
              (2**-1070, 2**-1072, 2**-1060)]
    for s_top, s_logit, s_spread in scales:
        def draw(scale: float) -> torch.Tensor:
            return torch.rand(200, 1, generator=generator, dtype=torch.float64) * scale
        top, spread = draw(s_top), draw(s_spread)
        logits = draw(s_logit) * torch.where(draw(1.0) < 0.5, -1.0, 1.0)
        got = lower_gaps(top, logits, spread)
        for t, v, w, g in zip(top.flatten().tolist(), logits.flatten().tolist(),
                              spread.flatten().tolist(), got.flatten().tolist(), strict=True):
            assert Fraction(g) <= Fraction(t) - Fraction(v) - Fraction(w), (t, v, w)
