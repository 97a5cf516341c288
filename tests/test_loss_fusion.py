"""CROWN-IBP's loss fusion (certnet.bounds.margins.fused_training_loss): an upper bound on the
cross-entropy over the whole threat set, checked in float64 against random and gradient-ascent
points; at beta = 0 it is IBP's robust cross-entropy; the method trains and saves with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from certnet.archs import build_arch
from certnet.bounds import fused_training_loss, training_bounds
from certnet.checkpoint import load
from certnet.config import TrainConfig
from certnet.methods.bound_prop import CrownIBPNet, robust_logits
from certnet.threat import ThreatModel
from certnet.train import Trainer

F64 = torch.float64


def conv_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(24, 8), nn.ReLU(),
                         nn.Linear(8, 5)).double()


def worst_ce(net: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel,
             seed: int) -> torch.Tensor:
    """The largest CE found per point: random points of the set, then sign-gradient (l_inf)
    or normalised-gradient (l2) ascent on the CE from each, projected onto ball and box."""
    g = torch.Generator().manual_seed(seed)
    best = torch.full((len(x),), -torch.inf, dtype=F64)
    lo, hi = threat.box(x)
    for _ in range(8):
        if threat.norm == "linf":
            point = lo + (hi - lo) * torch.rand(x.shape, generator=g, dtype=F64)
        else:
            step = torch.randn(x.shape, generator=g, dtype=F64)
            point = (x + threat.eps * step / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                     ).clamp(0, 1)
        for _ in range(30):
            point = point.detach().requires_grad_()
            loss = F.cross_entropy(net(point), y, reduction="none")
            best = torch.maximum(best, loss.detach())
            grad, = torch.autograd.grad(loss.sum(), point)
            if threat.norm == "linf":
                point = torch.minimum(torch.maximum(point + 0.05 * threat.eps * grad.sign(),
                                                    lo), hi)
            else:
                unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                delta = point + 0.1 * threat.eps * unit - x
                norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                point = (x + delta * torch.clamp(threat.eps / norms.clamp_min(1e-30), max=1)
                         ).clamp(0, 1)
        best = torch.maximum(best, F.cross_entropy(net(point.detach()), y, reduction="none"))
    return best


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_fused_bound_is_above_the_cross_entropy_everywhere_in_the_set(norm, beta):
    for seed in range(3):
        net = conv_net(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(6, 1, 9, 9, generator=g, dtype=F64)
        y = torch.randint(0, 5, (6,), generator=g)
        threat = ThreatModel(norm, 0.05 if norm == "linf" else 0.3)
        bound, lower, logits = fused_training_loss(net, x, threat, y, beta)
        assert bound.shape == (6,) and lower.shape == (6, 4)
        torch.testing.assert_close(logits, net(x))
        assert (bound >= worst_ce(net, x, y, threat, seed) - 1e-9).all(), (seed, beta)


def test_fused_bound_at_beta_zero_is_ibps_robust_cross_entropy():
    net = conv_net(4)
    x = torch.rand(5, 1, 9, 9, generator=torch.Generator().manual_seed(4), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4])
    threat = ThreatModel("linf", 0.1)
    bound, lower, _ = fused_training_loss(net, x, threat, y, 0.0)
    ibp, _ = training_bounds(net, x, threat, y, 0.0)
    torch.testing.assert_close(lower, ibp)
    torch.testing.assert_close(bound, F.cross_entropy(robust_logits(ibp, y), y,
                                                      reduction="none"))


def test_fused_bound_mixes_its_two_sums_linearly_and_its_crown_sum_is_the_chords():
    """exp(bound(beta)) = (1 - beta) exp(bound(0)) + beta exp(bound(1)) (the two sums are
    mixed before the log, everything scaled by the same exp(-max u)); at beta = 1 the sum is
    sum_j (exp(l_j) - s_j l_j) + 1 - CROWN-IBP's lower bound of sum_j s_j m_j, s_j the
    chords of exp on IBP's [l_j, u_j] (rebuilt here from IBP's margins and training_bounds'
    backward pass)."""
    from certnet.bounds import backward_bound, interval_walk, margin_spec
    from certnet.bounds.crown import affine_tail

    net = conv_net(6)
    x = torch.rand(4, 1, 9, 9, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    threat = ThreatModel("linf", 0.05)
    at = {beta: fused_training_loss(net, x, threat, y, beta)[0] for beta in (0.0, 0.3, 1.0)}
    torch.testing.assert_close(at[0.3].exp(), 0.7 * at[0.0].exp() + 0.3 * at[1.0].exp(),
                               rtol=1e-12, atol=0)
    seen, logits = interval_walk(net, x, threat)
    spec = margin_spec(y, logits.shape[1]).to(F64)
    lower = backward_bound(net, seen, spec, x, threat, stop=affine_tail(net))
    upper = -backward_bound(net, seen, -spec, x, threat, stop=affine_tail(net))
    lo, hi = -upper, -lower  # d_j = z_j - z_y
    chord = (hi.exp() - lo.exp()) / (hi - lo)
    fused = backward_bound(net, seen, (chord.unsqueeze(2) * spec).sum(1, keepdim=True), x,
                           threat).squeeze(1)
    total = 1 + (lo.exp() - chord * lo).sum(1) - fused
    torch.testing.assert_close(at[1.0], total.log(), rtol=1e-10, atol=1e-12)


def test_fused_bound_stays_finite_where_the_margins_overflow_exp():
    """Wide intervals early in training: exp(u_j) overflows float32 at u_j ~ 89; the bound is
    computed relative to exp(max u) and stays finite, gradients too."""
    net = conv_net(5).float()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(30)
    x = torch.rand(4, 1, 9, 9, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 3])
    bound, lower, _ = fused_training_loss(net, x, ThreatModel("linf", 0.3), y, 0.5)
    assert (-lower).amax() > 100 and torch.isfinite(bound).all()
    bound.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_crown_ibp_trains_saves_and_loads_with_loss_fusion(tmp_path):
    config = TrainConfig(method="crown-ibp", arch="dm-small", dataset="mnist", eps=0.1,
                         epochs=1, batch_size=50, train_limit=200, eval_limit=100,
                         method_kwargs={"loss_fusion": True},
                         loss_schedules={"kappa": 0.5, "beta": 0.5})
    record = Trainer(config, tmp_path / "run", progress=False).fit()
    assert record["train_loss"] == record["train_loss"]  # finite, not NaN
    model = load(tmp_path / "run")
    assert isinstance(model, CrownIBPNet) and model.loss_fusion
    plain = CrownIBPNet(build_arch("dm-small", (1, 28, 28), 10), (1, 28, 28), 10)
    assert plain.method_config()["loss_fusion"] is False
