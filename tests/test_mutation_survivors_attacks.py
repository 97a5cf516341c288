"""Tests written against the mutants of ``certnet.attacks`` that survived ``scripts/mutation.sh``
(the list, with the mutant each test kills and the equivalent ones, is the ``certnet.attacks``
section of tests/mutation/survivors.md).

tests/test_attacks.py checks PGD end to end (in the ball and the box, finds the exact linear
boundary, never flips a certified point), which a weaker or differently randomised attack still
passes. These pin the documented contract exactly: ``_exact_fit`` leaves perturbations that fit
untouched, moves only the coordinates that stick out, shrinks an l2 perturbation by up to ~26%
before giving up and falls back to x for the rows it cannot fix; restart 0 starts at x, odd
restarts uniformly in the ball, even ones on the sphere / corners, all drawn from the seed; the
step schedule (2.5 eps / steps or ``step_size``, halved at 50% and 75%, normalised gradient or
its sign) is followed to the letter; the strongest iterate is returned, flipped points are not
attacked again and the attack stops once every point has flipped; arguments are validated."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from certnet.attacks import PGD, margin_loss, perturbation_norm
from certnet.errors import ConfigError, InputError

U1 = 2.0 ** -24  # float32 spacing just below 1.0 (and just above 0.5)


def _pgd(norm: str, **kw) -> PGD:
    return PGD(nn.Linear(2, 2), 0.1, norm, **kw)  # the model is not used by the helpers


def _f32(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# -- _exact_fit ------------------------------------------------------------------------------

def test_exact_fit_l2_keeps_what_fits_shrinks_what_it_can_and_drops_the_rest():
    """Row 0 needs coordinate 0 (one float32 step below x = 1) rounded away, which no shrink
    by <= 26% achieves (eps = 0.95 of that step): it falls back to x exactly. Row 1 lies
    exactly on the sphere (norm 0.625 in float64) and row 2 inside: both are returned as
    they are. Row 3 (eps = 0.63 of the step) is fixed by the 10th, 26% shrink: coordinate 0
    rounds back to x, coordinate 1 keeps a smaller perturbation of the same sign."""
    small = 2.0 ** -10
    x = _f32([1.0, small], [0.125, 0.25], [0.5, 0.5], [1.0, small])
    adv = _f32([1.0 - U1, small + 0.3 * U1], [0.5, 0.75], [0.6, 0.5], [1.0 - U1, small + 0.3 * U1])
    eps = _f32(0.95 * U1, 0.625, 0.5, 0.63 * U1)
    out = _pgd("l2")._exact_fit(adv, x, eps)
    assert (perturbation_norm(out - x, "l2") <= eps.double()).all()
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1:3], adv[1:3])
    assert out[3, 0] == 1.0 and 0 < out[3, 1] - x[3, 1] < adv[3, 1] - x[3, 1]


def test_exact_fit_linf_moves_only_the_coordinates_beyond_eps_and_drops_the_rest():
    """Row 0: one coordinate 12 ulps beyond x, eps 1.5 ulps: ten one-ulp steps do not fix it,
    so the row falls back to x. Row 1: coordinate 0 exactly at eps, coordinate 1 one ulp
    beyond (moved back exactly onto eps), coordinate 2 inside: only coordinate 1 moves."""
    x = _f32([0.5, 0.5, 0.5], [0.5, 0.25, 0.5])
    adv = _f32([0.5 + 12 * U1, 0.5, 0.5], [0.75, 0.5 + U1, 0.6])
    eps = _f32(1.5 * U1, 0.25)
    out = _pgd("linf")._exact_fit(adv, x, eps)
    assert (perturbation_norm(out - x, "linf") <= eps.double()).all()
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], _f32(0.75, 0.5, float(adv[1, 2])))


# -- random starts ---------------------------------------------------------------------------

def _ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples in [0, 1] from the uniform distribution."""
    u = u.double().flatten().sort().values
    n = len(u)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(grid - u, u - (grid - 1 / n)).abs().max())


@pytest.mark.parametrize("shape", [(512, 2, 8), (256, 1)])
def test_starts_are_x_uniform_in_the_ball_and_on_its_boundary(shape):
    """Restart 0 is x; odd restarts are uniform in the ball (l2: (r/eps)^d uniform; l_inf:
    each coordinate uniform in [-eps, eps]); even restarts lie on the l2 sphere / on l_inf
    corners with random signs; all of it drawn from the seed. x = 0.5 and eps <= 0.5, so the
    pixel box clips nothing. (256, 1): the l2 sphere in one dimension is {-eps, eps}."""
    x = torch.full(shape, 0.5)
    d = x[0].numel()
    for norm, e in (("l2", 0.5), ("linf", 0.25)):
        eps = torch.full((shape[0],), e)
        attack = _pgd(norm)
        gen = torch.Generator().manual_seed(3)
        starts = [attack._start(r, x, eps, gen) for r in range(5)]
        gen = torch.Generator().manual_seed(3)
        again = [attack._start(r, x, eps, gen) for r in range(5)]
        assert all(torch.equal(a, b) for a, b in zip(starts, again, strict=True))
        assert torch.equal(starts[0], x)
        for r in (1, 3):
            delta = (starts[r] - x).double().flatten(1)
            if norm == "l2":
                assert _ks_uniform((delta.norm(dim=1) / e) ** d) < 0.1, (norm, r)
            else:
                assert _ks_uniform((delta / e + 1) / 2) < 0.1, (norm, r)
        for r in (2, 4):
            delta = (starts[r] - x).double().flatten(1)
            if norm == "l2":
                assert torch.allclose(delta.norm(dim=1), torch.full((shape[0],), e,
                                      dtype=torch.float64), rtol=1e-6, atol=0), (norm, r)
            else:
                assert torch.allclose(delta.abs(), torch.full_like(delta, e), rtol=1e-6,
                                      atol=0), (norm, r)
            assert 0.4 < (delta.sign() > 0).double().mean() < 0.6
            assert 0.4 < (delta[:, 0] > 0).double().mean() < 0.6
        assert not torch.equal(starts[1], starts[3]) and not torch.equal(starts[2], starts[4])


def test_a_single_point_batch_gets_its_random_starts():
    """A batch of one point (restarts draw a radius per point from row 0's size)."""
    x = torch.full((1, 6), 0.5)
    for norm in ("l2", "linf"):
        attack = _pgd(norm)
        gen = torch.Generator().manual_seed(0)
        for r in range(3):
            start = attack._start(r, x, torch.tensor([0.25]), gen)
            assert perturbation_norm(start - x, norm) <= 0.25 * (1 + 1e-6)
            assert r == 0 or not torch.equal(start, x)


# -- the step schedule -----------------------------------------------------------------------

class _Recorder(nn.Module):
    """Logits (0, v . x - c) for every point, recording every batch it is called on."""

    def __init__(self, v: torch.Tensor, c: float | torch.Tensor) -> None:
        super().__init__()
        self.v, self.c, self.seen = v, c, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        z = (x.flatten(1) * self.v).sum(1) - self.c
        return torch.stack([torch.zeros_like(z), z], 1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_steps_follow_the_documented_schedule(norm):
    """On a linear model that never flips, the iterates of restart 0 move by step_size along
    the normalised gradient (l2) or its sign (l_inf), halved from 50% and quartered from 75%
    of the steps; a coordinate with zero gradient never moves; steps + 1 iterates in all."""
    v = torch.tensor([0.1, -0.2, 0.0, 0.15])  # ||v||_2 = 0.27 < 1
    x = torch.full((2, 4), 0.5)
    model = _Recorder(v, 100.0)
    step, steps = 0.01, 8
    y = torch.zeros(2, dtype=torch.long)
    PGD(model, 0.3, norm, steps=steps, restarts=1, step_size=step)(x, y)
    iterates = model.seen[1:]  # seen[0] is the clean forward pass
    assert len(iterates) == steps + 1
    direction = v / v.norm() if norm == "l2" else v.sign()
    decays = [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]
    for t, decay in enumerate(decays):
        moved = (iterates[t + 1] - iterates[t]).double()
        expected = (step * decay * direction).double().expand_as(moved)
        assert torch.allclose(moved, expected, rtol=1e-4, atol=1e-7), (t, moved, expected)
    assert (torch.stack(iterates)[:, :, 2] == 0.5).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_default_step_is_two_and_a_half_eps_over_steps(norm):
    v = torch.tensor([0.1, -0.2, 0.0, 0.15])
    model = _Recorder(v, 100.0)
    eps, steps = 0.2, 50
    PGD(model, eps, norm, steps=steps, restarts=1)(torch.full((2, 4), 0.5),
                                                  torch.zeros(2, dtype=torch.long))
    first = perturbation_norm(model.seen[2] - model.seen[1], norm)
    assert torch.allclose(first, torch.full_like(first, 2.5 * eps / steps), rtol=1e-4)


def test_defaults_are_the_documented_ones():
    attack = PGD(nn.Linear(2, 2), 0.1)
    assert (attack.norm, attack.steps, attack.restarts, attack.step_size, attack.seed) == \
        ("l2", 100, 10, None, 0)


# -- which iterate is returned ---------------------------------------------------------------

class _Up(nn.Module):
    """Class 1 wins once the pixels sum to 100: PGD pushes every pixel up as far as it may."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1).sum(1)
        return torch.stack([torch.full_like(z, 100.0), z], 1)


class _Bumps(nn.Module):
    """1-D points: left of 0.5 the class-1 logit is a narrow peak above 0 at 0.276 (l_inf PGD
    from 0.25 steps onto it and off it again), right of it a peak that stays below 0 at 0.776
    (PGD oscillates around it and never flips). Records every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        s = x[:, 0]
        z = torch.where(s < 0.5, 0.3 - 100 * (s - 0.276).abs(), -0.3 - 100 * (s - 0.776).abs())
        return torch.stack([torch.zeros_like(z), z], 1)


def test_the_strongest_iterate_is_returned_and_a_flip_is_kept():
    """Restart 0: point 0 flips at one iterate only (step 7 of 8) and must come back flipped;
    point 1 never flips, its last iterate is weaker than its best. Restart 1 attacks point 1
    alone (point 0 has flipped), and point 1 comes back as its strongest iterate overall."""
    model = _Bumps()
    x = torch.tensor([[0.25], [0.75]])
    y = torch.zeros(2, dtype=torch.long)
    out = PGD(model, 0.1, "linf", steps=8, restarts=2)(x, y)
    first = torch.stack([s for s in model.seen[1:] if len(s) == 2])  # restart 0: (9, 2, 1)
    again = [s for s in model.seen[1:] if len(s) == 1]  # restart 1: point 1 alone
    assert len(first) == 9 and len(again) == 9
    point1 = torch.cat([first[:, 1], torch.cat(again)])  # every iterate of point 1
    with torch.no_grad():
        loss0 = margin_loss(model(first[:, 0]), y[:1].expand(9))
        loss1 = margin_loss(model(point1), y[:1].expand(len(point1)))
        final = model(out)
    # the test is not vacuous: point 0 flips, then un-flips by the last iterate; point 1's
    # last iterate is weaker than its best
    assert (loss0 > 0).any() and loss0[-1] < 0
    assert loss1[8] < loss1[:9].max()
    assert final[0].argmax() == 1
    assert torch.equal(out[1], point1[int(loss1.argmax())])
    assert margin_loss(final, y)[1] == loss1.max()


def test_the_attack_depends_only_on_its_seed():
    """Starts (every iterate the model sees) are drawn from ``seed`` alone, not from the
    global generator."""
    x = torch.full((4, 3), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    runs = []
    for global_seed, seed in ((1, 5), (2, 5), (1, 6)):
        torch.manual_seed(global_seed)
        model = _Recorder(torch.tensor([0.3, -0.2, 0.1]), 100.0)
        PGD(model, 0.2, "l2", steps=2, restarts=3, seed=seed)(x, y)
        runs.append(torch.cat(model.seen))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_float64_inputs_are_attacked_within_the_float64_eps(norm):
    """eps is used in x's dtype: in float64, 0.1 is not rounded up to float32's 0.1000000015."""
    x = torch.zeros(2, 8, dtype=torch.float64)
    adv = PGD(_Up(), 0.1, norm, steps=5, restarts=1)(x, torch.zeros(2, dtype=torch.long))
    assert adv.dtype == torch.float64
    dist = perturbation_norm(adv - x, norm)
    assert (dist <= 0.1).all() and (dist >= 0.1 * (1 - 1e-12)).all()


def test_points_already_flipped_are_returned_as_they_are_and_the_attack_stops():
    """Misclassified points are not attacked (they come back as x); once every point has
    flipped the attack stops: here all flip at the first step, so the model sees the clean
    batch, iterate 0 and iterate 1 only, whatever the number of restarts and steps."""
    x = torch.tensor([[0.9] * 4, [0.5] * 4, [0.5] * 4])  # point 0 starts flipped
    model = _Recorder(torch.ones(4), 2.05)
    y = torch.zeros(3, dtype=torch.long)
    out = PGD(model, 0.1, "linf", steps=20, restarts=4, step_size=0.02)(x, y)
    assert torch.equal(out[0], x[0])
    assert len(model.seen) == 3
    with torch.no_grad():
        assert (model(out).argmax(1) == 1).all()


def test_a_single_unflipped_point_is_attacked():
    model = _Recorder(torch.tensor([1.0, 1.0]), 1.1)
    x = torch.full((1, 2), 0.5)
    out = PGD(model, 0.1, "linf", steps=10, restarts=1)(x, torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        assert model(out).argmax(1).item() == 1


# -- argument checks -------------------------------------------------------------------------

def test_arguments_are_validated_at_their_limits():
    model = nn.Linear(2, 2)
    PGD(model, 0.1, steps=1, restarts=1, step_size=0.5)  # the smallest valid counts
    PGD(model, torch.tensor([0.0, 0.5]))  # per-point radii of 0 and below 1 are fine
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="step_size must be a positive number"):
            PGD(model, 0.1, step_size=bad)
    for name in ("steps", "restarts"):
        for bad in (True, 2.0, 0):
            with pytest.raises(ConfigError, match=f"^{name} must be a positive integer"):
                PGD(model, 0.1, **{name: bad})
    for eps in (torch.ones(2, 1), torch.ones(2, dtype=torch.long), torch.tensor([0.1, math.nan]),
                torch.tensor([0.1, -0.1])):
        with pytest.raises(InputError, match="a per-point eps must be a 1-D float tensor of "
                                             "finite values >= 0"):
            PGD(model, eps)
    with pytest.raises(InputError):
        PGD(model, math.nan)


def test_inputs_are_validated_with_their_messages():
    model = nn.Linear(3, 2)
    attack = PGD(model, 0.1, steps=1, restarts=1)
    y = torch.zeros(2, dtype=torch.long)
    attack(torch.full((2, 3), 0.5), y)  # a (B, d) batch is fine
    with pytest.raises(InputError, match=r"^x must be a batch tensor of shape \(B, \.\.\.\)$"):
        attack(torch.full((3,), 0.5), y)
    for bad in (torch.zeros(3, dtype=torch.long), y.float()):
        with pytest.raises(InputError, match=r"^labels must be an int64 tensor of shape \(2,\)$"):
            attack(torch.full((2, 3), 0.5), bad)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 2\)"):
        attack(torch.full((2, 3), 0.5), torch.tensor([0, 2]))
    with pytest.raises(InputError, match="per-point eps has 3 entries for a batch of 2"):
        PGD(model, torch.full((3,), 0.1), steps=1, restarts=1)(torch.full((2, 3), 0.5), y)


# -- a gap this triage found, fixed ------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.3)])
def test_perturbations_fit_an_eps_that_float32_rounds_up(norm, eps):
    """PGD once rounded eps to x's dtype to nearest (0.1 -> 0.10000000149 in float32) and fit
    the perturbations to that: a "flip" could lie just outside the caller's ball."""
    x = torch.zeros(2, 8)
    adv = PGD(_Up(), eps, norm, steps=5, restarts=1)(x, torch.zeros(2, dtype=torch.long))
    assert (perturbation_norm(adv - x, norm) <= eps).all()
