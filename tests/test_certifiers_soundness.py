"""Soundness of every certifier (certnet.certifiers) from two sides.

* the exact oracle (certnet.verify) on hundreds of tiny random ReLU / MinMax nets with 2-4
  inputs, dense and convolutional, in l_inf and l2: a certified point is robust, a
  certificate's margin never exceeds the exact minimum margin, a certified radius holds;
  exact on nets without hidden layers;
* PGD with restarts on small briefly-trained networks (an IBP MLP, a CROWN-IBP DM-small with
  BatchNorm, a GloRo 2C2F certified in l_inf too, GloRo nets with clipped activations, an
  l_inf-dist MLP, a conv l_inf-dist net with a tanh head): no certified point flips, no
  attained margin lies below a certificate's margin, no point flips inside its certified
  radius;
* ``best``: exactly the union of the single certifiers, the largest radius; its margin never
  above the largest single margin, and equal to it where nothing certifies.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import random_cnn, random_mlp
from torch import nn

from certnet.archs import INITS, build_arch
from certnet.attacks import PGD, margin_loss
from certnet.bounds import margin_bounds
from certnet.certifiers import applicable, certify
from certnet.certifiers.base import CERTIFIERS
from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.floats import round_down
from certnet.methods.bound_prop import CrownIBPNet, IBPNet
from certnet.methods.gloro import GloroNet
from certnet.methods.linf_dist import LinfDistNet
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift
from certnet.nn.lipschitz import convert_sequential
from certnet.threat import ThreatModel
from certnet.verify import exact_min_margin

NORMS = ("linf", "l2")
BOUND_CERTIFIERS = ("ibp", "crown-ibp", "crown", "alpha-crown")
RADIUS_CERTIFIERS = ("lipschitz", "linf-lipschitz")
SINGLE = ("lipschitz", "linf-lipschitz", "local-lipschitz", *BOUND_CERTIFIERS)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def certificates(model, x: torch.Tensor, eps: float, norm: str) -> dict:
    """Every certifier that applies, and ``best``, on the batch."""
    names = [*applicable(model, norm), "best"]
    return {name: certify(model, x, eps, name, norm) for name in names}


def margins64(layers: nn.Sequential, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """min_{j != label} z_label - z_j per point, float64 forward pass of a float64 copy."""
    with torch.no_grad():
        logits = copy.deepcopy(layers).double().eval()(x.double())
    return -margin_loss(logits, label)


# -- tiny nets against the exact oracle -------------------------------------------------------
def tiny_model(seed: int, d: int, widths: list[int], act: str, classes: int, gain: float,
               kind: str):
    """Flatten, [Linear, act] * len(widths), Linear; hidden weights times ``gain`` (kinks
    inside small balls). ``kind``: "gloro" (Lipschitz layers; every certifier applies) or
    "ibp" (plain nn.Linear in an IBPNet; the bound certifiers apply)."""
    layers = random_mlp(seed, d, widths, act, classes, gain)
    if kind == "gloro":
        return GloroNet(convert_sequential(layers, (d,)), (d,), classes).eval()
    return IBPNet(layers, (d,), classes).eval()


@st.composite
def tiny_models(draw):
    """(model, description, depth)."""
    d = draw(st.integers(2, 4))
    depth = draw(st.sampled_from([0, 1, 1, 2, 2]))
    widths = [draw(st.sampled_from([2, 4, 6, 8])) for _ in range(depth)]
    act = draw(st.sampled_from(["relu", "minmax"]))
    classes = draw(st.integers(2, 4))
    gain = draw(st.sampled_from([1.0, 2.0, 4.0]))
    kind = draw(st.sampled_from(["gloro", "ibp"]))
    seed = draw(st.integers(0, 2**16))
    model = tiny_model(seed, d, widths, act, classes, gain, kind)
    return model, f"{kind} seed={seed} d={d} widths={widths} {act} K={classes} gain={gain}", \
        depth


@st.composite
def tiny_conv_models(draw):
    """(model, description, depth): random_cnn on 1 x 2 x 2 inputs (the l2 oracle enumerates
    at most 4 input dimensions), Lipschitz convolutions in a GloRo net or plain ones in an
    IBP net."""
    channels = draw(st.sampled_from([[2], [4], [2, 2], [2, 4]]))
    act = draw(st.sampled_from(["relu", "minmax"]))
    classes = draw(st.integers(2, 4))
    gain = draw(st.sampled_from([1.0, 2.0, 4.0]))
    kind = draw(st.sampled_from(["gloro", "ibp"]))
    seed = draw(st.integers(0, 2**16))
    shape = (1, 2, 2)
    layers = random_cnn(seed, shape, channels, act, classes, gain)
    model = GloroNet(convert_sequential(layers, shape), shape, classes) if kind == "gloro" \
        else IBPNet(layers, shape, classes)
    return model.eval(), f"{kind} conv seed={seed} channels={channels} {act} K={classes} " \
        f"gain={gain}", len(channels)


def oracle_problems(model, desc: str, depth: int, seed: int, eps: float,
                    stats: Counter[str]) -> list[str]:
    """Every way the certificates of two random points contradict the exact oracle (see
    :func:`test_certificates_never_contradict_the_exact_oracle`), counting what was checked
    in ``stats``."""
    problems = []
    x = torch.rand(2, *model.input_shape, generator=gen(seed))
    for norm in NORMS:
        certs = certificates(model, x, eps, norm)
        pred = certs["best"].pred
        for name, cert in certs.items():
            assert torch.equal(cert.pred, pred), (name, desc)
        for i in range(len(x)):
            label = int(pred[i])
            exact = exact_min_margin(model.layers, x[i], label, eps, norm)
            tol = 1e-9 * (1 + abs(exact))
            where = f"{desc}, x={x[i].tolist()}, {norm} eps={eps}, pred={label}, m*={exact}"
            stats["cases"] += 1
            stats["not_robust"] += exact <= 0
            for name, cert in certs.items():
                certified = bool(cert.certified[i])
                stats[f"certified_{name}"] += certified
                if certified and exact <= 0:
                    problems.append(f"{name} certified a non-robust point: {where}")
                if cert.margin is None:
                    continue
                margin = float(cert.margin[i])
                if margin > exact + tol:
                    problems.append(f"{name} margin {margin} > m*: {where}")
                stats["caught_if_margin_overstated"] += 0 < margin + 0.05 and exact <= 0
                if depth == 0 and norm == "linf" and name in BOUND_CERTIFIERS:
                    stats["exact_linear"] += 1
                    if abs(margin - exact) > 1e-6 * (1 + abs(exact)):
                        problems.append(f"{name} margin {margin} != m* on a linear net: "
                                        f"{where}")
            for name in RADIUS_CERTIFIERS:
                if name not in certs or float(certs[name].radius[i]) <= 0:
                    continue
                r = float(certs[name].radius[i]) * (1 - 1e-6)
                stats[f"radius_checks_{name}"] += 1
                if exact_min_margin(model.layers, x[i], label, r, norm, domain=None) <= 0:
                    problems.append(f"{name} radius {r} is not robust: {where}")
    return problems


def oracle_stats(models: st.SearchStrategy, examples: int, label: str) -> Counter[str]:
    """:func:`oracle_problems` on ``examples`` hypothesis draws of (model, point seed, eps);
    fails with the problems found, else returns what was checked."""
    stats: Counter[str] = Counter()
    problems: list[str] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(case=models, seed=st.integers(0, 2**16),
           eps=st.sampled_from([0.01, 0.03, 0.1, 0.3, 0.6]))
    def check(case, seed, eps):
        problems.extend(oracle_problems(*case, seed, eps, stats))

    check()
    print(f"\n{label}: {dict(sorted(stats.items()))}")
    assert not problems, "\n".join(problems[:20])
    return stats


@pytest.mark.parametrize("examples", [
    150, pytest.param(2000, marks=pytest.mark.slow, id="2000-slow")])
def test_certificates_never_contradict_the_exact_oracle(examples):
    """For every certifier that applies (and best), in l_inf and l2, with the exact minimum
    margin m* over ball ∩ [0, 1]^d of the certificate's prediction: certified => m* > 0;
    margin <= m*; a Lipschitz radius r is robust (m* > 0 at r (1 - 1e-6), box ignored).
    Teeth: nets without hidden layers are bounded exactly in l_inf (all bound certifiers), and
    margins overstated by 0.05 would certify some non-robust points."""
    stats = oracle_stats(tiny_models(), examples, "certifiers vs exact oracle")
    n = stats["cases"]
    assert stats["not_robust"] >= 0.1 * n, stats
    for name in (*SINGLE, "best"):
        assert stats[f"certified_{name}"] >= 0.1 * n, (name, stats)
    assert stats["exact_linear"] >= 20 and stats["radius_checks_lipschitz"] >= 0.2 * n, stats
    assert stats["radius_checks_linf-lipschitz"] >= 0.05 * n, stats
    assert stats["caught_if_margin_overstated"] >= 0.02 * n, stats


@pytest.mark.parametrize("examples", [
    60, pytest.param(600, marks=pytest.mark.slow, id="600-slow")])
def test_conv_certificates_never_contradict_the_exact_oracle(examples):
    """The same checks on tiny conv nets, which the oracle reads as dense matrices: the
    convolution paths of every certifier (the polyphase FFT spectral bound, conv rounding and
    bound rules, masked conv bounds of the local certificate, im2col chunks)."""
    stats = oracle_stats(tiny_conv_models(), examples, "conv certifiers vs exact oracle")
    n = stats["cases"]
    assert stats["not_robust"] >= 0.1 * n, stats
    for name in ("lipschitz", "local-lipschitz", *BOUND_CERTIFIERS, "best"):  # not l_inf-dist's
        assert stats[f"certified_{name}"] >= 0.1 * n, (name, stats)
    assert stats["radius_checks_lipschitz"] >= 0.1 * n, stats
    assert stats["caught_if_margin_overstated"] >= 0.02 * n, stats


@pytest.mark.parametrize("norm", NORMS)
def test_best_is_the_union_of_the_single_certifiers_on_tiny_nets(norm):
    """On tiny nets of both kinds: best certifies exactly the points some applicable certifier
    certifies, with the largest radius; ``by`` names one that certified it. (best runs each
    certifier on the points still open only; nets with two hidden layers are certified one
    point at a time, where full CROWN's batch dependence, pinned in test_bounds.py, cannot
    make a subset's bounds differ from the whole batch's.)"""
    checked = Counter()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(case=tiny_models(), seed=st.integers(0, 2**16),
           eps=st.sampled_from([0.01, 0.05, 0.2]))
    def check(case, seed, eps):
        model, desc, depth = case
        x = torch.rand(8 if depth < 2 else 1, *model.input_shape, generator=gen(seed))
        checked[check_best(certificates(model, x, eps, norm), eps)] += 1

    check()
    assert checked[True] >= 10, checked  # some points certified by some, not all, certifiers


def check_best(certs: dict, eps: float) -> bool:
    """The best-certificate contract; returns whether some point was certified by some but
    not all single certifiers (the union is then not trivial)."""
    best = certs.pop("best")
    assert set(certs) <= set(SINGLE) and certs
    union = torch.stack([c.certified for c in certs.values()]).any(0)
    inter = torch.stack([c.certified for c in certs.values()]).all(0)
    assert torch.equal(best.certified, union)
    assert torch.equal(best.radius, torch.stack([c.radius for c in certs.values()]).amax(0))
    margins = [c.margin for c in certs.values() if c.margin is not None]
    if margins:  # best stops at the first certifier that proves a point (cheapest first), so
        # its margin is the largest only where nothing certified; never above the largest
        largest = torch.stack(margins).amax(0)
        assert bool((best.margin <= largest + 1e-10).all())  # (subsets round differently)
        open_ = ~best.certified
        assert torch.allclose(best.margin[open_], largest[open_], rtol=0, atol=1e-10), \
            (best.margin[open_] - largest[open_]).abs().max()
    for name, cert in certs.items():  # what best skips as subsumed is certified by its subsumer
        for other in CERTIFIERS[name].subsumes:
            if other in certs:
                assert bool((cert.certified | ~certs[other].certified).all()), (name, other)
    for i, by in enumerate(best.by):
        assert (by == "") == (not bool(best.certified[i]))
        assert by == "" or bool(certs[by].certified[i])
    if "lipschitz" in certs:  # never fewer points or a smaller radius than lipschitz alone
        lip = certs["lipschitz"]
        assert bool((best.certified | ~lip.certified).all())
        assert bool((best.radius >= lip.radius).all())
    for cert in certs.values():
        if cert.gives_radius:  # up to the float32 rounding (down) of the reported radius
            differ = cert.certified != (cert.radius > eps)
            assert bool(((cert.radius[differ].double() - eps).abs() <= 1e-6 * eps).all())
        else:  # eps rounded down to float32: never more than proved
            proved = round_down(torch.tensor(eps, dtype=torch.float64))
            assert float(proved) <= eps
            assert torch.equal(cert.radius, torch.where(cert.certified, proved, 0.0))
    certs["best"] = best
    return bool((union & ~inter).any())


# -- PGD against small briefly-trained networks ---------------------------------------------------
SIZE = 10
SHAPE = (1, SIZE, SIZE)
CLASSES = 4


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-like 10x10 images of 4 classes: a horizontal bar, a vertical bar, a diagonal, a
    square ring, at jittered positions, over noise; pixels in [0, 1]."""
    g = gen(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    img = torch.rand(n, SIZE, SIZE, generator=g) * 0.25
    off = torch.randint(-2, 3, (n, 2), generator=g)
    r = torch.arange(SIZE)
    for i in range(n):
        a, b = 4 + int(off[i, 0]), 4 + int(off[i, 1])
        if y[i] == 0:
            img[i, a:a + 2, 1:SIZE - 1] = 1.0
        elif y[i] == 1:
            img[i, 1:SIZE - 1, b:b + 2] = 1.0
        elif y[i] == 2:
            img[i, r, (r + int(off[i, 0])).clamp(0, SIZE - 1)] = 1.0
        else:
            img[i, max(a - 2, 0):a + 3, max(b - 2, 0):b + 3] = 1.0
            img[i, max(a - 1, 0):a + 2, max(b - 1, 0):b + 2] = 0.1
    return img.clamp(0, 1).unsqueeze(1), y


def train(model, steps: int, eps: float, seed: int, **loss_kwargs):
    x, y = synthetic_digits(512, seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = gen(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss, _ = model.loss(x[idx], y[idx], eps * min(1.0, 2 * (step + 1) / steps),
                             **loss_kwargs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_models():
    """(name, model, {norm: eps}): small nets trained a few dozen steps on synthetic digits."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 32), nn.ReLU(), nn.Linear(32, 32),
                            nn.ReLU(), nn.Linear(32, CLASSES))
        ibp = train(IBPNet(mlp, SHAPE, CLASSES), 40, 0.05, 1, kappa=0.5)
        small = build_arch("dm-small", SHAPE, CLASSES, seed=2, init="ibp", batchnorm=True)
        crown_ibp = train(CrownIBPNet(small, SHAPE, CLASSES), 30, 0.05, 2, kappa=0.5,
                          beta=1.0)
        gloro = train(GloroNet(build_arch("2c2f", SHAPE, CLASSES, seed=3), SHAPE, CLASSES),
                      40, 0.5, 3)
        dist = build_arch("linf-dist-mlp", SHAPE, CLASSES, seed=4, init="linf-dist", depth=3,
                          width=32)
        linf_dist = train(LinfDistNet(dist, SHAPE, CLASSES), 40, 0.15, 4, lam=0.05)
        # the other layer types with bound rules: clipped activations, the conv l_p-dist layer,
        # a tanh head (v2's hybrid)
        clipped = {act: train(GloroNet(build_arch("2c2f", SHAPE, CLASSES, seed=5,
                                                  activation=act), SHAPE, CLASSES), 40, 0.5, 5)
                   for act in ("clipped-relu", "clipped-minmax")}
        hybrid = nn.Sequential(LinfDistConv2d(1, 8, 3, stride=2, padding=1), MeanShift(8),
                               nn.Flatten(), LinfDist(8 * 5 * 5, 16), MeanShift(16),
                               nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES))
        INITS["linf-dist"](hybrid)
        conv_dist = train(LinfDistNet(hybrid, SHAPE, CLASSES), 40, 0.15, 6, lam=0.05)
    # radii at which some points are certified and PGD flips some others
    return [("ibp-mlp", ibp, {"linf": 0.06, "l2": 0.6}),
            ("crown-ibp-dm-small-bn", crown_ibp, {"linf": 0.06, "l2": 0.3}),
            ("gloro-2c2f", gloro, {"linf": 0.03, "l2": 0.3}),
            ("linf-dist-mlp", linf_dist, {"linf": 0.1, "l2": 0.2}),
            ("gloro-clipped-relu", clipped["clipped-relu"], {"linf": 0.03, "l2": 0.3}),
            ("gloro-clipped-minmax", clipped["clipped-minmax"], {"linf": 0.03, "l2": 0.3}),
            ("linf-dist-conv-tanh-head", conv_dist, {"linf": 0.05, "l2": 0.1})]


@pytest.fixture(scope="module")
def attacked():
    """Per (model, norm): the certificates of 32 test points and the PGD points against their
    predictions (plus, for lipschitz, PGD at each point's own certified radius)."""
    x, _ = synthetic_digits(32, 99)
    out = []
    for name, model, eps in trained_models():
        for norm in NORMS:
            certs = certificates(model, x, eps[norm], norm)
            pred = certs["best"].pred
            adv = PGD(model, eps[norm], norm, steps=30, restarts=3, seed=0)(x, pred)
            at_radius = None
            radius_certifier = next((c for c in ("lipschitz", "linf-lipschitz") if c in certs),
                                    None)
            if radius_certifier is not None:
                radius = certs[radius_certifier].radius * (1 - 1e-6)
                at_radius = (radius, PGD(model, radius, norm, steps=30, restarts=3,
                                         seed=1)(x, pred))
            out.append((f"{name}-{norm}", model, x, eps[norm], norm, certs, adv, at_radius))
    return out


def test_pgd_never_breaks_a_certificate_of_a_trained_network(attacked):
    certified_somewhere = Counter()
    flipped = Counter()
    for name, model, x, eps, norm, certs, adv, at_radius in attacked:
        pred = certs["best"].pred
        dist = (adv - x).flatten(1).double()
        dist = dist.norm(dim=1) if norm == "l2" else dist.abs().amax(1)
        # (PGD measures the ball with eps rounded to x's float32, hence the 1e-6)
        assert (dist <= eps * (1 + 1e-6)).all(), name
        at_adv = margins64(model.layers, adv, pred)
        at_x = margins64(model.layers, x, pred)
        flipped[name] = int((at_adv <= 0).sum())
        for cname, cert in certs.items():
            assert torch.equal(cert.pred, pred), (name, cname)
            assert (at_x[cert.certified] > 0).all(), (name, cname)
            broken = cert.certified & (at_adv <= 0)
            assert not broken.any(), (name, cname, broken.nonzero().flatten().tolist())
            certified_somewhere[name] += int(cert.certified.sum())
            if cert.margin is not None:
                tol = 1e-9 * (1 + at_adv.abs().max())
                assert (cert.margin <= at_adv + tol).all(), (name, cname)
                assert (cert.margin <= at_x + tol).all(), (name, cname)
        if at_radius is not None:  # no flip inside any point's own certified radius
            radius, adv_r = at_radius
            d = (adv_r - x).flatten(1).double()
            d = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
            assert (d <= radius.double()).all(), name
            proved = radius > 0
            assert (margins64(model.layers, adv_r, pred)[proved] > 0).all(), name
    print(f"\ncertified (all certifiers): {dict(certified_somewhere)}\nPGD flips: {dict(flipped)}")
    # not vacuous: every model certifies some points and PGD flips some others
    for name, *_ in attacked:
        assert certified_somewhere[name] > 0, (name, certified_somewhere)
    assert sum(flipped.values()) > 0, flipped


def test_best_on_trained_networks(attacked):
    """The best contract on the trained nets; on the GloRo net (l_inf included) it certifies
    every point lipschitz certifies."""
    for name, _, _, eps, _, certs, *_ in attacked:
        certs = dict(certs)
        check_best(certs, eps)
        if name.startswith("gloro"):
            assert "lipschitz" in certs
            assert bool((certs["best"].certified >= certs["lipschitz"].certified).all())


# -- contracts and refusals ---------------------------------------------------------------------
@pytest.mark.parametrize("layer", [nn.AvgPool2d(2, ceil_mode=True),
                                   nn.AvgPool2d(2, count_include_pad=False, padding=1),
                                   nn.AvgPool2d(2, divisor_override=3),
                                   nn.BatchNorm2d(2, track_running_stats=False)])
def test_layers_the_rules_do_not_cover_are_refused_up_front(layer):
    """Pooling variants the AvgPool rule does not cover, and BatchNorm without running
    statistics (it normalises by the batch: a certificate would depend on the other points),
    are refused when the model is built and by every bound entry point."""
    layers = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.LazyLinear(2))
    layers(torch.rand(2, 1, 6, 6))  # materialise the lazy layer
    layers = nn.Sequential(*layers[:-1], nn.Linear(layers[-1].in_features, 2))
    with pytest.raises(UnsupportedLayerError):
        IBPNet(layers, (1, 6, 6), 2)
    with pytest.raises(UnsupportedLayerError):
        margin_bounds(layers.eval(), torch.rand(2, 1, 6, 6), ThreatModel("linf", 0.1),
                      torch.zeros(2, dtype=torch.long))


def test_certifiers_that_do_not_apply_are_refused_by_name():
    """lipschitz needs Lipschitz layers: an IBPNet of plain nn.Linear gets a ConfigError that
    names the certifier and the applicable ones."""
    model = tiny_model(0, 3, [4], "relu", 2, 1.0, "ibp")
    assert applicable(model, "l2") == ["linf-lipschitz", "ibp", "crown-ibp", "crown", "alpha-crown"]
    with pytest.raises(ConfigError, match="'lipschitz' does not apply.*applicable"):
        certify(model, torch.rand(2, 3), 0.1, "lipschitz", "l2")
    assert set(applicable(tiny_model(0, 3, [4], "relu", 2, 1.0, "gloro"), "linf")) == \
        set(SINGLE)
