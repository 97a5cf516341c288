"""Tests that kill the survivors of an outside mutation-testing run: each names the mutant of
``src/certnet`` it fails on (a change no other test caught)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from exact import ExactNet
from safetensors.torch import load_file, save_file
from torch import nn

from certnet.attacks import PGD, perturbation_norm
from certnet.bounds import crown_walk, margin_spec
from certnet.bounds.alpha_crown import optimized_bound
from certnet.bounds.crown import backward_bound
from certnet.certifiers import certify
from certnet.errors import CheckpointError
from certnet.methods.gloro import GloroNet
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear
from certnet.nn.masked_spectral import GramTail
from certnet.nn.spectral import magnitude_bound
from certnet.threat import ThreatModel
from certnet.train import TrainConfig, Trainer

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- 1. rounding.py _conv: the conv rounding rule returning RoundingBound() --------------------
def _conv1x1(weight: torch.Tensor, bias: float) -> LipschitzConv2d:
    conv = LipschitzConv2d(weight.shape[1], weight.shape[0], 1, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(weight.view(*weight.shape, 1, 1))
        conv.bias.fill_(bias)
    return conv


def test_conv_rounding_covers_cancelling_huge_biases():
    """Kills ``_conv`` returning ``RoundingBound()``: hidden = 3x + 1e16 (1x1 convolutions),
    then hidden - 1e16 is exactly 3x, but float64 rounds the hidden values to multiples of 2, so
    the mutant certified x = (0.4, 0.3) at radius 0.47 where the exact radius is 0.07."""
    eye = torch.eye(2, dtype=F64)
    head = LipschitzLinear(2, 2, dtype=F64)
    with torch.no_grad():
        head.weight.copy_(eye)
        head.bias.zero_()
    layers = nn.Sequential(_conv1x1(3 * eye, 1e16), nn.ReLU(), _conv1x1(eye, -1e16),
                           nn.Flatten(), head)
    net = GloroNet(layers, (2, 1, 1), 2).eval()
    x = torch.tensor([[0.4, 0.3], [0.3, 0.4], [0.9, 0.1], [0.5, 0.5]]).view(4, 2, 1, 1)
    cert = net.certify(x, 0.0)
    k = net.sound_lipschitz()
    exact = ExactNet(net.layers)
    for n in range(len(x)):
        radius = Fraction(float(cert.radius[n]))
        if radius == 0:
            continue
        logits, j = exact(x[n].double().numpy()), int(cert.pred[n])
        for i in range(2):
            if i != j:
                assert logits[j] - logits[i] > radius * Fraction(float(k[j, i])), \
                    f"point {n}: radius {float(radius)} exceeds the exact one"


# -- 2. alpha_crown.py optimized_bound: the last iterate instead of the best ------------------
@pytest.mark.parametrize("lr", [10.0, 50.0])
def test_alpha_crown_keeps_the_best_iterate_at_a_large_learning_rate(lr):
    """Kills ``best = bound.detach()`` (or the last pass's bound) in place of the running
    maximum: at a large learning rate the iterates jump around and the last one falls below
    CROWN's own bound, which the best of them never does."""
    g = gen(3)
    dims = [6, 16, 16, 16, 4]
    mods: list[nn.Module] = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1]).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=F64))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=F64) * 0.1)
        mods += [lin, nn.ReLU()]
    layers = nn.Sequential(*mods[:-1])
    x = torch.rand(8, dims[0], generator=g, dtype=F64)
    threat = ThreatModel("linf", 0.1)
    with torch.no_grad():
        seen, logits = crown_walk(layers, x, threat)
        spec = margin_spec(logits.argmax(1), dims[-1]).to(F64)
        crown = backward_bound(layers, seen, spec, x, threat, "adaptive")
        alpha = optimized_bound(layers, seen, spec, x, threat, "adaptive", lr=lr)
        last = optimized_bound(layers, seen, spec, x, threat, "adaptive", lr=lr, steps=0)
        # rigorous: the slopes are chosen on the plain bound; each row's best ones are kept
        # and the rigorous bound is evaluated there (not at the last iterate's)
        rigorous_seen, _ = crown_walk(layers, x, threat, rigorous=True)
        rigorous = optimized_bound(layers, rigorous_seen, spec, x, threat, "adaptive", lr=lr,
                                   rigorous=True)
        plain_there = optimized_bound(layers, rigorous_seen, spec, x, threat, "adaptive",
                                      lr=lr)
    assert (alpha >= crown).all(), (alpha - crown).min()
    assert torch.equal(last, crown)  # no steps: CROWN's own bound
    assert (rigorous <= plain_there).all()
    assert (rigorous >= plain_there - 1e-9 * (1 + plain_there.abs())).all(), \
        (rigorous - plain_there).min()


# -- 3. spectral.py magnitude_bound made smaller ----------------------------------------------
def _dense_operator(weight: torch.Tensor, stride: int, padding: int, hw: int) -> torch.Tensor:
    """The matrix of the convolution on (C, hw, hw) inputs."""
    c = weight.shape[1]
    eye = torch.eye(c * hw * hw, dtype=F64).view(-1, c, hw, hw)
    return torch.nn.functional.conv2d(eye, weight, None, stride, padding).flatten(1).T


def _magnitude_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(name, weight, exact ||abs(A)||_2, whether the Schur test is exact for it)."""
    g = gen(5)
    cases = []
    for shape in [(7, 5), (3, 12), (20, 20)]:
        w = torch.randn(shape, generator=g, dtype=F64)
        cases.append((f"randn{shape}", w, w.abs(), False))
    signs = torch.randint(0, 2, (6, 9), generator=g).to(F64) * 2 - 1
    cases.append(("signs", 0.37 * signs, signs.abs() * 0.37, True))  # |A| = c J: exact
    perm = torch.eye(8, dtype=F64)[torch.randperm(8, generator=g)]
    cases.append(("signed-permutation", -2.5 * perm, 2.5 * perm, True))
    for scale in (1e-200, 1e200):
        cases.append((f"ones*{scale}", torch.full((4, 6), scale, dtype=F64),
                      torch.full((4, 6), scale, dtype=F64), True))
    spike = torch.full((5, 5), 1e-3, dtype=F64)
    spike[2, 3] = -40.0
    cases.append(("spike", spike, spike.abs(), False))
    out = []
    for name, w, a, tight in cases:
        m = a.abs().max()  # exact norm on a rescaled copy: no under- or overflow
        out.append((name, w, torch.linalg.matrix_norm(a / m, 2) * m, tight))
    # convolutions: 1x1 (|A| = |W| kron I, exact) and a 3x3 kernel on its true operator
    w1 = torch.randn(4, 3, 1, 1, generator=g, dtype=F64)
    out.append(("conv1x1", w1, torch.linalg.matrix_norm(w1.abs()[:, :, 0, 0], 2), False))
    w3 = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    for stride, padding in [(1, 1), (2, 0)]:
        a = _dense_operator(w3.abs(), stride, padding, 8)
        out.append((f"conv3x3-s{stride}p{padding}", w3, torch.linalg.matrix_norm(a, 2), False))
    ones = torch.ones(1, 1, 3, 3, dtype=F64)  # circular-like: interior rows/columns sum 9
    out.append(("conv-ones", ones, torch.linalg.matrix_norm(_dense_operator(ones, 1, 2, 30),
                                                             2), False))
    return out


@pytest.mark.parametrize("case", _magnitude_cases(), ids=lambda c: c[0])
def test_magnitude_bound_is_an_upper_bound_and_tight_where_schur_is(case):
    """Kills ``magnitude_bound`` made 2% smaller: it must bound ||abs(A)||_2 from above, and
    equal it (up to the bound slack) where the Schur test is exact."""
    name, weight, exact, tight = case
    bound = magnitude_bound(weight)
    assert bound >= exact, (name, float(bound / exact))
    if tight:
        assert bound <= exact * (1 + 1e-6), (name, float(bound / exact))
    else:
        assert bound <= exact * 20


# -- 4. masked_spectral.py GramTail without its rounding terms -------------------------------
@pytest.mark.parametrize("rank", [32, 3])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_gram_tail_bounds_masks_that_remove_the_dominant_columns(rank, delta):
    """Aimed at ``GramTail`` without its rounding terms (in ``tail``): with the dominant
    columns masked the kept norm is small next to the rounding of the full Gram, and the
    bound must still lie above the exact masked norm. (The bound alone does not kill that
    mutant: the ``error`` term, >= 2 gamma_{n+2} ||D||, and the 1e-9 slack cover every rounding
    a float64 BLAS shows at test sizes; the next test checks the tail's own contract.)"""
    g = gen(11)
    a = torch.randn(400, 12, generator=g, dtype=F64)
    a[:, 2:] *= delta
    a[:, 2] += delta * a[:, 0]  # a kept column along the dominant direction
    keep = torch.ones(5, 12, dtype=F64)
    keep[:, :2] = 0
    keep[1, 5:] = 0
    keep[2, 3:] = 0
    keep[3, 1] = 1
    keep[4, 0] = 1
    keep[4, 3:] = 0
    bound = GramTail.of(a, rank).bound(keep)
    exact = torch.stack([torch.linalg.matrix_norm(a * k, 2) for k in keep])
    assert (bound >= exact).all(), bound / exact


def _psd(matrix: list[list[Fraction]]) -> bool:
    """Whether a symmetric rational matrix is positive semidefinite (exact elimination)."""
    m = [row[:] for row in matrix]
    for i in range(len(m)):
        if m[i][i] < 0 or (m[i][i] == 0 and any(m[i][i + 1:])):
            return False
        for j in range(i + 1, len(m)):
            f = m[j][i] / m[i][i] if m[i][i] else Fraction(0)
            m[j] = [a - f * b for a, b in zip(m[j], m[i], strict=True)]
    return True


def test_gram_tail_covers_the_rounding_of_the_gram_itself():
    """Kills ``GramTail`` without its rounding terms: the contract ||G - V d V^T||_2 <= tail
    in exact arithmetic. Here fl(A^T A) is diagonal and eigh reproduces it exactly, so the
    computed rest is 0, but the exact Gram differs from fl(A^T A) by 2^-60: only the rounding
    terms cover that."""
    a = torch.tensor([[1 + 2**-30, 0.0], [0.0, 1.0]], dtype=F64)
    split = GramTail.of(a, rank=2)
    k = split.scale.numel()
    rows = [[Fraction(float(v)) / Fraction(float(split.magnitude)) for v in row]
            for row in a.tolist()]  # the split is of A / magnitude (a power of two)
    gram = [[sum(r[i] * r[j] for r in rows) for j in range(2)] for i in range(2)]
    vectors = split.outer.view(2, k, k)  # v_s v_s^T per coordinate s: recover V d V^T exactly
    scale = [Fraction(float(v)) for v in split.scale]
    assert set(split.outer.abs().flatten().tolist()) <= {0.0, 1.0}  # V: a signed permutation
    low_rank = [[sum(scale[p] ** 2 * Fraction(float(vectors[i, p, p])) for p in range(k))
                 if i == j else Fraction(0) for j in range(2)] for i in range(2)]
    rest = [[gram[i][j] - low_rank[i][j] for j in range(2)] for i in range(2)]
    tail = Fraction(float(split.tail))
    eye = [[Fraction(int(i == j)) for j in range(2)] for i in range(2)]
    assert max(abs(rest[0][0]), abs(rest[1][1])) > 0  # the rounding is really there
    for sign in (1, -1):
        assert _psd([[tail * eye[i][j] - sign * rest[i][j] for j in range(2)]
                     for i in range(2)])


# -- 5. checkpoint.py load_train_state: the training-state checksum skipped -------------------
def test_resume_refuses_a_corrupted_training_state(tmp_path, mnist_available):
    """Kills skipping the sha256 check of ``state/epoch-*/state.safetensors``: a state whose
    tensors were changed (the file still loads) must stop ``--resume`` with a CheckpointError,
    not resume silently from the changed tensors."""
    config = TrainConfig(epochs=2, train_limit=256, eval_limit=64, batch_size=128, eps=0.3)
    Trainer(config, tmp_path / "run", progress=False).fit(stop_after=1)
    (state,) = (tmp_path / "run" / "state").glob("epoch-*/state.safetensors")
    tensors = load_file(state)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, state)
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(config, tmp_path / "run", resume=True, progress=False)


# -- 6. attacks.py PGD projecting on a ball of radius 2 eps -------------------------------------
class _Linear(nn.Module):
    """Logits (0, v . (x - x0) - c): class 0 at x0, class 1 only beyond the threat ball."""

    def __init__(self, v: torch.Tensor, x0: torch.Tensor, c: float) -> None:
        super().__init__()
        self.v, self.x0, self.c = v, x0, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = ((x - self.x0).flatten(1) * self.v).sum(1) - self.c
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_pushes_to_the_boundary_and_never_beyond(norm):
    """Kills ``eps * 2`` in PGD's projection: a linear model whose label only flips beyond
    the ball (each point's margin grows along v), so every iterate runs to the boundary; the
    returned perturbations must have norm <= eps and some reach 0.99 eps."""
    g = gen(7)
    d, eps = 16, 0.05
    x = 0.25 + 0.5 * torch.rand(32, d, generator=g)
    v = torch.randn(d, generator=g)
    reach = eps * float(v.norm() if norm == "l2" else v.abs().sum())
    model = _Linear(v, x[0], 3 * reach)
    y = torch.zeros(len(x), dtype=torch.long)
    adv = PGD(model, eps, norm, steps=50, restarts=2, seed=0)(x, y)
    dist = perturbation_norm(adv - x, norm).double()
    assert (dist <= eps * (1 + 1e-6)).all(), dist.max() / eps
    assert (dist >= 0.99 * eps).any(), dist.max() / eps


# -- 8. lipschitz / local-lipschitz: the l_inf radius is the l2 radius over sqrt(d) ------------
def _mlp_net(seed: int, d: int) -> GloroNet:
    g = gen(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [d, 24, 24, 4]
    for i in range(3):
        lin = LipschitzLinear(widths[i], widths[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / widths[i] ** 0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        layers += [lin, nn.ReLU()]
    return GloroNet(nn.Sequential(*layers[:-1]), (d,), 4).eval()


def test_lipschitz_linf_radius_is_the_l2_radius_over_sqrt_d():
    """Kills a ``lipschitz`` certifier whose l_inf radius is not the l2 radius / sqrt(d): the
    l_inf radius is the l2 one divided by sqrt(d) (its ball lies in that l2 ball), up to the
    rounding down of both to float32."""
    d = 36
    net = _mlp_net(0, d)
    x = torch.rand(64, d, generator=gen(1))
    r2 = certify(net, x, 0.0, "lipschitz", "l2").radius
    rinf = certify(net, x, 0.0, "lipschitz", "linf").radius
    assert (r2 > 0).sum() > 10
    # both are float32 radii rounded down from float64 ones: equal within two float32 ulps
    expected = r2.double() / math.sqrt(d)
    ulp = torch.finfo(torch.float32).eps * expected
    assert ((rinf.double() - expected).abs() <= 2 * ulp).all()


def test_local_lipschitz_linf_uses_the_l2_ball_of_radius_eps_sqrt_d():
    """Kills ``local-lipschitz`` certifying l_inf eps without the sqrt(d) factor: a point
    certified in l_inf at eps is certified in l2 at eps sqrt(d) (the l2 ball holding the
    l_inf one), and some points certified in l2 at eps are not at eps sqrt(d)."""
    d = 36
    net = _mlp_net(0, d)
    x = torch.rand(64, d, generator=gen(1))
    r2 = certify(net, x, 0.0, "lipschitz", "l2").radius.double()
    eps = float(r2[r2 > 0].median()) / math.sqrt(d)
    wide = math.nextafter(eps * math.sqrt(d), math.inf) * (1 + 1e-12)
    linf = certify(net, x, eps, "local-lipschitz", "linf").certified
    l2_wide = certify(net, x, wide, "local-lipschitz", "l2").certified
    l2_narrow = certify(net, x, eps, "local-lipschitz", "l2").certified
    assert not (linf & ~l2_wide).any()
    assert (l2_narrow & ~l2_wide).any()  # the mutant would certify these in l_inf
    assert linf.any()
