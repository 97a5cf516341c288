"""Tests written against the mutants of the ``patches`` slice (``bounds/crown_patches.py``,
CROWN's patches mode) that survived ``scripts/mutation.sh`` (the list, with the mutant each
test kills and the equivalent ones, is the ``certnet.bounds.crown_patches`` section of
tests/mutation/survivors.md).

The other patches tests use convolutions of few input channels, square strides and no
identity layer: every backward convolution took the dense window-matrix path. These take the
transposed-convolution path too (more input channels, wider windows), strides and paddings
that differ per dimension, an identity layer inside the walk, and compare the rigorous
patches pass's charges with the full maps' pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from certnet.bounds import crown as crown_module
from certnet.bounds import crown_patches
from certnet.bounds.crown import _neuron_bounds, crown_walk
from certnet.bounds.ibp import interval_walk
from certnet.threat import ThreatModel


def _net() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(11)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=(2, 1), padding=(1, 2)), nn.ReLU(),
                        nn.Identity(), nn.Conv2d(6, 6, 3, stride=(1, 2), padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, (3, 2), padding=(1, 0)), nn.ReLU(), nn.Flatten())
    net = net.double()
    x = torch.rand(2, 3, 14, 11, dtype=torch.float64)
    return net, x


@pytest.mark.parametrize("rigorous", [False, True])
def test_patches_through_transposed_convolutions_give_the_full_maps_bounds(monkeypatch,
                                                                          rigorous):
    net, x = _net()
    threat = ThreatModel("linf", 0.03)
    paths = []
    transpose = crown_patches.F.conv_transpose2d

    def spy_transpose(*args, **kwargs):
        paths.append("transpose")
        return transpose(*args, **kwargs)
    monkeypatch.setattr(crown_patches.F, "conv_transpose2d", spy_transpose)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat, rigorous=rigorous)
        assert crown_module.patch_plan(net, seen, threat, 6) is not None
        patched, _ = crown_walk(net, x, threat, rigorous=rigorous)
        assert paths  # the transposed-convolution path, beside the dense matrices
        monkeypatch.setattr(crown_module, "patch_plan", lambda *args: None)
        dense, _ = crown_walk(net, x, threat, rigorous=rigorous)
    for a, b in zip(patched, dense, strict=True):
        assert torch.allclose(a.lo, b.lo, rtol=0, atol=1e-10)
        assert torch.allclose(a.hi, b.hi, rtol=0, atol=1e-10)
    assert any((a.lo > b.lo).any() or (a.hi < b.hi).any()
               for a, b in zip(patched, interval_walk(net, x, threat, rigorous=rigorous)[0],
                               strict=True))  # the passes did tighten something


def test_a_rigorous_patches_pass_charges_what_the_full_maps_pass_charges(monkeypatch):
    """A rigorous pass through an identity layer (a scalar rho) runs (it failed on patches),
    and each step's charge on patches is ||lam||_1 max rho over its windows, as on full maps:
    the rigorous bounds trail the plain ones by about the same on both (the charges, ~1e-13
    of a bound, dwarf the orders the two passes sum in)."""
    net, x = _net()
    threat = ThreatModel("linf", 0.03)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat, rigorous=True)
        rows = torch.arange(seen[6].lo[0].numel())
        gaps = {}
        for mode in ("patches", "maps"):
            if mode == "maps":
                monkeypatch.setattr(crown_module, "patch_plan", lambda *args: None)
            plain = _neuron_bounds(net, seen, x, threat, "adaptive", 6, rows)
            rigorous = _neuron_bounds(net, seen, x, threat, "adaptive", 6, rows, rigorous=True)
            gaps[mode] = (plain[0] - rigorous[0], rigorous[1] - plain[1])
    for on_patches, on_maps in zip(gaps["patches"], gaps["maps"], strict=True):
        assert (on_patches > 0).all() and (on_maps > 0).all()
        ratio = on_patches / on_maps
        assert ratio.min() > 0.5 and ratio.max() < 2.0, (ratio.min(), ratio.max())


def test_chunked_patches_give_the_same_bounds(monkeypatch):
    """One point, one position and one slot per chunk: the same neuron bounds."""
    net, x = _net()
    threat = ThreatModel("linf", 0.03)
    with torch.no_grad():
        seen, _ = interval_walk(net, x, threat)
        rows = torch.arange(seen[6].lo[0].numel())
        whole = _neuron_bounds(net, seen, x, threat, "adaptive", 6, rows)
        monkeypatch.setattr(crown_module, "PATCH_CHUNK_ELEMENTS", 1)
        chunked = _neuron_bounds(net, seen, x, threat, "adaptive", 6, rows)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
