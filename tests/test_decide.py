"""Deciding VNN-LIB properties (certnet.decide, certnet verify): never "holds" where the
exact oracle finds a violation, a "violated" answer's counterexample replays exactly, box
bounds contain sampled outputs, and the CLI writes VNN-COMP result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from certnet.bounds.margins import spec_bounds
from certnet.cli import main
from certnet.decide import decide, prepare
from certnet.errors import InputError, UnsupportedLayerError
from certnet.properties import linf_robustness, read_result, read_vnnlib
from certnet.threat import BoxThreat
from certnet.verify.oracle import exact_min_margin

VNNCOMP = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"


def _net(seed: int, d: int = 3, width: int = 8, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes)).double().eval()


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha-crown"])
def test_box_bounds_contain_sampled_outputs(method):
    generator = torch.Generator().manual_seed(1)
    for seed in range(4):
        net = _net(seed)
        lo = torch.rand(3, generator=generator, dtype=torch.float64) - 0.5
        hi = lo + torch.rand(3, generator=generator, dtype=torch.float64) * 0.4
        threat = BoxThreat.of(lo, hi)
        spec = torch.randn(1, 5, 3, generator=generator, dtype=torch.float64)
        lower = spec_bounds(net, threat.center(), threat, spec, method, rigorous=True)[0]
        samples = lo + (hi - lo) * torch.rand(2000, 3, generator=generator, dtype=torch.float64)
        corners = torch.stack(torch.meshgrid(*[torch.stack([a, b]) for a, b in
                                               zip(lo, hi, strict=True)], indexing="ij"), -1)
        points = torch.cat([samples, corners.reshape(-1, 3)])
        with torch.no_grad():
            values = net(points) @ spec[0].T
        assert (values >= lower).all()


def test_decide_never_contradicts_the_exact_oracle():
    """Random tiny ReLU nets, points and radii: every "holds" has an exact minimum margin > 0,
    every "violated" a counterexample that satisfies the exact property, and both answers
    occur (so the check can fail)."""
    generator = torch.Generator().manual_seed(0)
    seen = {"holds": 0, "violated": 0, "unknown": 0}
    for seed in range(12):
        net = _net(seed)
        x = torch.rand(3, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            label = int(net(x.unsqueeze(0)).argmax())
        for eps in (0.01, 0.1, 0.4):
            prop = linf_robustness(x, eps, label, 3)
            verdict = decide(net, (3,), prop)
            seen[verdict.status] += 1
            exact = exact_min_margin(net, x, label, eps, "linf")
            if verdict.status == "holds":
                assert exact > 0, (seed, eps)
            elif verdict.status == "violated":
                assert prop.check_counterexample(verdict.x, verdict.y)
                with torch.no_grad():
                    assert torch.equal(net(verdict.x.view(1, 3))[0], verdict.y)
    assert seen["holds"] and seen["violated"], seen


def test_a_prepared_twin_is_reused_while_it_matches_the_network():
    """decide(twin=...) works on the twin's copy (and keeps its weight quantities there);
    once the network's weights change, it decides on a fresh copy of the new weights."""
    net = _net(3)
    x = torch.full((3,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        label = int(net(x.unsqueeze(0)).argmax())
    prop = linf_robustness(x, 0.02, label, 3)
    twin = prepare(net)
    alone = decide(net, (3,), prop, methods=("crown",), attack=False)
    assert alone.status == "holds"
    shared = decide(net, (3,), prop, methods=("crown",), attack=False, twin=twin)
    assert (shared.status, shared.proved_by) == (alone.status, alone.proved_by)
    assert twin.weight_memo  # the bound walk kept |W| and co. with the twin
    with torch.no_grad():
        net[-1].bias[label] -= 100  # the other classes now win everywhere: never provable
    flipped = decide(net, (3,), prop, methods=("crown",), attack=False, twin=twin)
    assert flipped.status == decide(net, (3,), prop, methods=("crown",), attack=False).status
    assert flipped.status != "holds"
    net[0].register_forward_hook(lambda m, i, o: o)  # the twin's copy has no hook: refused
    with pytest.raises(UnsupportedLayerError, match="forward hooks"):
        decide(net, (3,), prop, methods=("crown",), attack=False, twin=twin)


def test_decide_refuses_a_property_of_another_size():
    prop = linf_robustness(torch.zeros(4, dtype=torch.float64), 0.1, 0, 3)
    with pytest.raises(InputError, match="4 inputs"):
        decide(_net(0), (3,), prop)


@pytest.mark.skipif(not (VNNCOMP / "mnist_fc").is_dir(), reason="no shared VNN-COMP files")
def test_cli_verify_writes_vnncomp_results(tmp_path, capsys):
    pytest.importorskip("onnx")
    root = VNNCOMP / "mnist_fc"
    net, prop = root / "onnx" / "mnist-net_256x2.onnx", root / "vnnlib" / "prop_1_0.03.vnnlib"
    out, js = tmp_path / "r.txt", tmp_path / "r.json"
    assert main(["verify", str(net), str(prop), "--result", str(out), "--json", str(js)]) == 0
    result = read_result(out)
    payload = json.loads(js.read_text())
    assert payload["instances"][0]["result"] == result.status
    if result.status == "sat":  # the witness replays exactly on the exact property
        assert read_vnnlib(prop).check_counterexample(result.x, result.y)
    csv = tmp_path / "instances.csv"
    csv.write_text(f"{net},{prop},60\n{net},{root / 'vnnlib' / 'absent.vnnlib'},60\n")
    assert main(["verify", "--instances", str(csv), "--results-dir", str(tmp_path / "res"),
                 "--certifier", "ibp"]) == 0
    printed = capsys.readouterr().out
    assert "error" in printed and "summary:" in printed
    assert len(list((tmp_path / "res").iterdir())) == 1
    assert main(["verify", str(net)]) == 2
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real")
    assert main(["verify", str(net), str(bad)]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_bound_functions_defaults_are_the_documented_ones():
    """spec_bounds: plain CROWN with adaptive slopes; margin_bounds / margin_walk: IBP with
    adaptive slopes, plain. Each default is compared with the other choices, which differ on
    this net (so a changed default is seen)."""
    from certnet.bounds.margins import margin_bounds, margin_walk
    from certnet.threat import ThreatModel

    net = _net(5, width=16)
    x = torch.full((1, 3), 0.5, dtype=torch.float64)
    box = BoxThreat.of(x[0] - 0.3, x[0] + 0.3)
    spec = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        default = spec_bounds(net, x, box, spec)
        assert torch.equal(default, spec_bounds(net, x, box, spec, "crown", "adaptive",
                                                rigorous=False))
        for other in (dict(method="crown-ibp"), dict(slope="zero"), dict(rigorous=True)):
            assert not torch.equal(default, spec_bounds(net, x, box, spec, **other)), other
        threat, ref = ThreatModel("linf", 0.3), torch.tensor([0])
        ibp = margin_bounds(net, x, threat, ref)
        assert torch.equal(ibp, margin_bounds(net, x, threat, ref, "ibp", "adaptive"))
        assert torch.equal(ibp, margin_walk(net, x, threat, ref)[0])
        assert not torch.equal(ibp, margin_bounds(net, x, threat, ref, "crown"))
        assert not torch.equal(margin_walk(net, x, threat, ref, rigorous=True)[0], ibp)


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_the_slope_choice_reaches_the_intermediate_bounds(method):
    """margin_walk's intervals are full CROWN's with the caller's slope rule (not only its
    last pass): equal to crown_walk's at that slope, and different between two slopes."""
    from certnet.bounds.crown import crown_walk
    from certnet.bounds.margins import margin_walk
    from certnet.threat import ThreatModel

    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    torch.manual_seed(7)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.6)
    x = torch.full((2, 3), 0.5, dtype=torch.float64)
    threat, ref = ThreatModel("linf", 0.2), torch.tensor([0, 1])
    seen = {}
    with torch.no_grad():
        for slope in ("zero", "one"):
            seen[slope] = margin_walk(net, x, threat, ref, method, slope)[1]
            walk = crown_walk(net, x, threat, slope)[0]
            assert all(torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
                       for a, b in zip(seen[slope], walk, strict=True))
    assert any(not torch.equal(a.lo, b.lo) for a, b in zip(seen["zero"], seen["one"],
                                                            strict=True))
    # and spec_bounds's: its bound is the last pass on crown_walk's intervals at that slope
    from certnet.bounds.margins import _lower, margin_spec, spec_bounds

    spec = margin_spec(ref, 3).double()
    with torch.no_grad():
        for slope in ("zero", "one"):
            want = _lower(net, seen[slope], spec, x, threat, method, slope, False)
            assert torch.equal(spec_bounds(net, x, threat, spec, method, slope), want)
