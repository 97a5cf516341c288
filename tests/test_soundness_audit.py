"""One test class per false-certificate class found by the outside audit (issue 6, A1-A7).
Each test failed on certnet 0.1.0 (the commit before these fixes) and states the property
that rules the whole class out, not only the audit's reproducer."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import certnet
from certnet.archs import build_arch
from certnet.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    UnsupportedLayerError,
)
from certnet.methods.gloro import GloroNet
from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    convert_sequential,
    layer_bound,
    trace_shapes,
)
from certnet.nn.spec import build_layers, describe_layers
from certnet.nn.spectral import dense_spectral_bound, gram_spectral_bound

SHAPE = (1, 28, 28)


def _mlp(weights: list[torch.Tensor], biases: list[torch.Tensor]) -> GloroNet:
    """Flatten, then Linear/ReLU layers with the given float64-exact weights, then the head."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        lin = LipschitzLinear(w.shape[1], w.shape[0], dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    return GloroNet(nn.Sequential(*layers), (weights[0].shape[1],), weights[-1].shape[0]).eval()


def _exact_logits(net: GloroNet, x: torch.Tensor) -> list[Fraction]:
    """The network's logits at one point in exact rational arithmetic (Flatten/Linear/ReLU)."""
    v = [Fraction(float(t)) for t in x.flatten().tolist()]
    for layer in net.layers:
        if isinstance(layer, nn.Linear):
            w, b = layer.weight.detach().double().tolist(), layer.bias.detach().double().tolist()
            v = [sum((Fraction(wij) * vj for wij, vj in zip(row, v, strict=True)), Fraction(0))
                 + Fraction(bi) for row, bi in zip(w, b, strict=True)]
        elif isinstance(layer, nn.ReLU):
            v = [max(t, Fraction(0)) for t in v]
    return v


def _assert_exactly_sound(net: GloroNet, x: torch.Tensor) -> int:
    """Every claimed radius holds in exact arithmetic: for every other class i, the exact gap
    y_pred - y_i exceeds radius * K_pred,i (K bounds the Lipschitz constant of y_pred - y_i,
    so no point within the radius flips). Radii are the tightest claims, so this checks the
    certificate at every eps at once."""
    cert = net.certify(x, 0.0)
    k = net.sound_lipschitz()
    for n in (cert.radius > 0).nonzero().flatten().tolist():
        logits, j = _exact_logits(net, x[n]), int(cert.pred[n])
        radius = Fraction(float(cert.radius[n]))
        for i in range(len(logits)):
            if i != j:
                assert logits[j] - logits[i] > radius * Fraction(float(k[j, i])), \
                    f"point {n}: radius {float(radius)} but the exact gap to class {i} is " \
                    "too small"
    return int((cert.radius > 0).sum())


# -- A1: every layer's bound holds for the shape it actually sees ------------------------------
class TestShapes:
    def test_normalize_with_more_channels_than_its_input_is_refused(self):
        specs = [{"type": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.1, 0.2, 0.3]},
                 {"type": "flatten"},
                 {"type": "linear", "in_features": 3 * 16, "out_features": 3, "bias": True}]
        with pytest.raises(ConfigError, match="Normalize"):
            build_layers(specs, (1, 4, 4))  # broadcasting would make 3 channels out of 1

    def test_normalize_refuses_mismatched_mean_and_std_and_non_image_inputs(self):
        with pytest.raises(InputError):
            Normalize([0.5], [0.1, 0.2])
        with pytest.raises(InputError):
            Normalize([0.5], [0.1])(torch.rand(2, 8))

    def test_a_checkpoint_whose_normalization_broadcasts_does_not_load(self, tmp_path):
        net = _norm_net()
        certnet.save_model(tmp_path / "m", net, eps=0.1, dataset="mnist")
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        config["layers"][0] = {"type": "normalize", "mean": [0.5] * 3, "std": [0.1, 0.2, 0.3]}
        config["layers"][1]["in_features"] = 3 * 16
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError):
            certnet.load(tmp_path / "m")

    def test_normalize_bound_dominates_its_largest_ratio(self):
        layer = Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])
        x = torch.rand(256, 3, 4, 4, dtype=torch.float64)
        z = torch.rand(256, 3, 4, 4, dtype=torch.float64)
        ratio = (layer.double()(x) - layer.double()(z)).flatten(1).norm(dim=1) / \
            (x - z).flatten(1).norm(dim=1)
        assert float(ratio.max()) <= float(layer_bound(layer))

    def test_a_head_that_does_not_produce_flat_logits_is_refused(self):
        layers = nn.Sequential(LipschitzLinear(4, 4), MinMax(), LipschitzLinear(4, 3))
        with pytest.raises(ConfigError, match="logits"):
            GloroNet(layers, (2, 4), 3)  # Linear on the last axis: logits of shape (2, 3)


def _norm_net() -> GloroNet:
    layers = build_layers([{"type": "normalize", "mean": [0.5], "std": [0.25]},
                           {"type": "flatten"},
                           {"type": "linear", "in_features": 16, "out_features": 3,
                            "bias": True}], (1, 4, 4))
    return GloroNet(layers, (1, 4, 4), 3).eval()


# -- A2: a bound depends only on the architecture and the weights the forward uses -------------
class TestStoredState:
    def _edit_weights(self, path, edit) -> None:
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")
        config = json.loads((path / "config.json").read_text())
        config["model_sha256"] = hashlib.sha256(
            (path / "model.safetensors").read_bytes()).hexdigest()
        (path / "config.json").write_text(json.dumps(config))

    def test_a_stored_input_shape_that_disagrees_with_the_architecture_is_refused(self,
                                                                                tmp_path):
        net = GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10)
        certnet.save_model(tmp_path / "m", net, eps=0.3, dataset="mnist")
        # a certnet 0.1.0 checkpoint stored the shape as a buffer; a smaller map shrinks the
        # FFT bound while the forward pass stays the same
        self._edit_weights(tmp_path / "m", lambda t: t.update(
            {"layers.0.input_shape": torch.tensor([1, 6, 6])}))
        with pytest.raises(CheckpointError, match="input_shape"):
            certnet.load(tmp_path / "m")

    def test_the_committed_0_1_0_checkpoint_still_loads(self):
        model = certnet.load("models/gloro-mnist-0.3-2c2f")
        assert [m.input_shape for m in model.layers if isinstance(m, LipschitzConv2d)] == \
            [(1, 28, 28), (16, 14, 14)]

    def test_no_stored_buffer_can_shrink_the_bound_without_changing_the_forward(self):
        """For every non-parameter tensor in the state dict: changing it must either change
        the function, or be refused, or leave the sound constant as it was."""
        layers = build_layers([
            {"type": "normalize", "mean": [0.5], "std": [0.5]},
            {"type": "conv", "in_channels": 1, "out_channels": 4, "kernel_size": 3,
             "stride": 2, "padding": 1, "bias": True}, {"type": "minmax"},
            {"type": "residual_conv", "channels": 4, "kernel_size": 3, "alpha": 0.5,
             "bias": True}, {"type": "relu"}, {"type": "flatten"},
            {"type": "linear", "in_features": 64, "out_features": 3, "bias": True}], (1, 8, 8))
        net = GloroNet(layers, (1, 8, 8), 3).eval()
        x = torch.rand(8, 1, 8, 8)
        reference_out, reference_k = net(x), net.sound_lipschitz().clone()
        state = net.state_dict()
        params = {name for name, _ in net.named_parameters()}
        for key in [k for k in state if k not in params]:
            edited = GloroNet(build_layers(describe_layers(net.layers),
                                           (1, 8, 8)), (1, 8, 8), 3).eval()
            changed = {**state, key: state[key] * 0.5 + 0.25}
            try:
                edited.load_state_dict(changed)
            except (RuntimeError, CheckpointError, InputError):
                continue
            if torch.equal(edited(x), reference_out):
                assert torch.equal(edited.sound_lipschitz(), reference_k), key


# -- A3: conversion reproduces the given function or refuses -----------------------------------
class TestConversion:
    def _seq(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 14 * 14, 10))

    def test_converted_network_computes_exactly_the_same_outputs(self):
        seq = self._seq()
        net = GloroNet.from_sequential(seq, SHAPE)
        x = torch.rand(16, *SHAPE)
        assert torch.equal(net(x), seq(x))

    @pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm"])
    def test_hook_based_reparametrizations_are_refused(self, reparametrize):
        seq = self._seq()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            seq[3] = getattr(torch.nn.utils, reparametrize)(seq[3])
        with pytest.raises(UnsupportedLayerError, match="hooks"):
            GloroNet.from_sequential(seq, SHAPE)

    def test_parametrized_layers_are_refused(self):
        seq = self._seq()
        seq[3] = torch.nn.utils.parametrizations.weight_norm(seq[3])
        with pytest.raises(UnsupportedLayerError, match="parametriz"):
            convert_sequential(seq, SHAPE)

    def test_a_subclass_with_its_own_forward_is_refused(self):
        class Doubled(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        seq = self._seq()
        seq[3] = Doubled(4 * 14 * 14, 10)
        with pytest.raises(UnsupportedLayerError):
            convert_sequential(seq, SHAPE)


# -- A4: the float64 forward pass's rounding is covered, however large the values met ----------
class TestRounding:
    def test_cancelling_huge_biases_are_not_certified_from_rounded_logits(self):
        """hidden = 3x + 1e16, logits = hidden - 1e16: exactly 3x, but float64 rounds the
        hidden values to multiples of 2 (0.1.0 certified x = (0.4, 0.3) at eps 0.2, which a
        step of 0.2 towards class 1 flips)."""
        net = _mlp([3 * torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)],
                   [torch.full((2,), 1e16, dtype=torch.float64),
                    torch.full((2,), -1e16, dtype=torch.float64)])
        x = torch.tensor([[0.4, 0.3]])
        cert = net.certify(x, 0.2)
        assert not cert.certified.any() and cert.radius.item() == 0
        moved = x + 0.2 * torch.tensor([[-1.0, 1.0]]) / math.sqrt(2)
        exact = _exact_logits(net, moved[0])
        assert exact[1] > exact[0]  # the flip the certificate must not deny

    @pytest.mark.parametrize("scale", [1e6, 1e9, 1e12, 1e16])
    def test_certificates_hold_in_exact_arithmetic_with_large_intermediate_values(self,
                                                                                  scale):
        g = torch.Generator().manual_seed(int(math.log10(scale)))
        w1 = torch.randn(8, 4, generator=g, dtype=torch.float64)
        w2 = torch.randn(5, 8, generator=g, dtype=torch.float64)
        b1 = scale * (1 + torch.rand(8, generator=g, dtype=torch.float64))  # ReLUs all on
        b2 = -(w2 @ b1) + torch.randn(5, generator=g, dtype=torch.float64)  # cancels them
        net = _mlp([w1, w2], [b1, b2])
        _assert_exactly_sound(net, torch.rand(64, 4, generator=g))

    def test_ordinary_networks_still_certify(self):
        g = torch.Generator().manual_seed(1)
        net = _mlp([torch.randn(8, 4, generator=g, dtype=torch.float64),
                    torch.randn(5, 8, generator=g, dtype=torch.float64)],
                   [torch.randn(8, generator=g, dtype=torch.float64),
                    torch.randn(5, generator=g, dtype=torch.float64)])
        assert _assert_exactly_sound(net, torch.rand(64, 4, generator=g)) == 64


# -- A5: a zero, NaN or infinite bound certifies nothing ----------------------------------------
class TestOverflow:
    @pytest.mark.parametrize("magnitude", [1e-200, 1e-160, 1e160, 1e200])
    def test_dense_bounds_survive_under_and_overflow(self, magnitude):
        w = torch.randn(30, 20, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
        exact = float(torch.linalg.matrix_norm(w, 2)) * magnitude
        for bound in (gram_spectral_bound(w * magnitude), dense_spectral_bound(w * magnitude)):
            assert exact <= float(bound) <= exact * 1.5

    def test_tiny_head_weights_give_a_positive_pairwise_constant(self):
        g = torch.Generator().manual_seed(0)
        net = _mlp([torch.randn(6, 4, generator=g, dtype=torch.float64),
                    1e-170 * torch.randn(3, 6, generator=g, dtype=torch.float64)],
                   [torch.zeros(6, dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0])])
        k = net.sound_lipschitz()
        off_diagonal = ~torch.eye(3, dtype=torch.bool)
        assert (k[off_diagonal] > 0).all() and torch.isfinite(k).all()

    def test_an_underflowing_product_of_layer_bounds_certifies_nothing(self):
        net = _mlp([1e-200 * torch.eye(4, dtype=torch.float64),
                    1e-200 * torch.eye(4, dtype=torch.float64),
                    torch.eye(4, dtype=torch.float64)[:3]],
                   [torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                    torch.tensor([1.0, 0.0, -1.0])])
        cert = net.certify(torch.rand(8, 4), 0.1)
        assert not cert.certified.any() and (cert.radius == 0).all()

    @pytest.mark.parametrize("value", [math.inf, math.nan])
    def test_a_non_finite_bound_certifies_nothing_and_the_curve_agrees(self, value):
        net = GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10).eval()
        with torch.no_grad():
            net.layers[2].weight[0, 0, 0, 0] = value
        x = torch.rand(8, *SHAPE)
        cert = net.certify(x, 0.1)
        # radius 0 (0.1.0 gave inf for a NaN K, which the certified-accuracy curve counted)
        assert not cert.certified.any() and (cert.radius == 0).all()


# -- A6: hooks and stale caches ----------------------------------------------------------------
class TestHooksAndCaches:
    def _net(self):
        return GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10).eval()

    def test_forward_hooks_are_refused(self):
        net = self._net()
        handle = net.layers[0].register_forward_hook(lambda m, i, o: 10 * o)
        with pytest.raises(UnsupportedLayerError, match="hooks"):
            net.certify(torch.rand(2, *SHAPE), 0.1)
        handle.remove()
        handle = net.layers[3].register_forward_pre_hook(lambda m, i: (3 * i[0],))
        with pytest.raises(UnsupportedLayerError, match="hooks"):
            net.certify(torch.rand(2, *SHAPE), 0.1)
        handle.remove()
        net.certify(torch.rand(2, *SHAPE), 0.1)

    def test_global_hooks_and_patched_forwards_are_refused(self):
        net = self._net()
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
        try:
            with pytest.raises(UnsupportedLayerError, match="global"):
                net.certify(torch.rand(2, *SHAPE), 0.1)
        finally:
            handle.remove()
        net.layers[1].forward = lambda x: 5 * x
        with pytest.raises(UnsupportedLayerError, match="patched"):
            net.certify(torch.rand(2, *SHAPE), 0.1)

    def test_weights_changed_without_a_version_bump_are_seen(self):
        net = self._net()
        x = torch.rand(32, *SHAPE)
        eps = float(net.certify(x, 0.0).radius.double().median())
        before = net.certify(x, eps).certified.sum()
        net.layers[0].weight.data.mul_(100)  # .data: no autograd version counter change
        net.layers[-1].weight.data.mul_(100)
        after = net.certify(x, eps)
        fresh = GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10).eval()
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(after.radius, fresh.certify(x, eps).radius)
        assert after.certified.sum() <= before


# -- A7: smaller holes ----------------------------------------------------------------------------
class TestSmaller:
    def test_every_reported_radius_is_itself_certified(self):
        """The float32 radius is rounded down: certifying at exactly the reported radius
        still succeeds (0.1.0 rounded to nearest, so about half of these failed)."""
        net = GloroNet(build_arch("2c2f", SHAPE, 10, seed=1), SHAPE, 10).eval()
        with torch.no_grad():
            net.layers[-1].weight.mul_(4.0)
            net.layers[-1].bias.normal_(0.0, 0.5)
        x = torch.rand(200, *SHAPE)
        radius = net.certify(x, 0.0).radius
        for i in range(len(x)):
            if radius[i] > 0:
                assert net.certify(x[i:i + 1], float(radius[i])).certified.item(), i

    @pytest.mark.parametrize("eps", [True, False])
    def test_booleans_are_not_epsilons(self, eps):
        with pytest.raises(InputError):
            _norm_net().certify(torch.rand(1, 1, 4, 4), eps)

    @pytest.mark.parametrize("base", [LipschitzLinear, Normalize])
    def test_subclasses_of_bounded_layers_are_not_trusted(self, base):
        class Sneaky(base):
            def forward(self, x):
                return 10 * super().forward(x)

        layer = Sneaky(4, 4) if base is LipschitzLinear else Sneaky([0.0], [1.0])
        with pytest.raises(UnsupportedLayerError):
            layer_bound(layer)

    def test_a_conv_subclass_is_refused_by_a_gloro_net(self):
        class Sneaky(LipschitzConv2d):
            pass

        layers = nn.Sequential(Sneaky(1, 2, 3, padding=1), nn.Flatten(),
                               LipschitzLinear(2 * 16, 3))
        trace_shapes(layers, (1, 4, 4))
        with pytest.raises(UnsupportedLayerError):
            GloroNet(layers, (1, 4, 4), 3)

    def test_config_norm_must_match_the_model(self, tmp_path):
        certnet.save_model(tmp_path / "m", _norm_net(), eps=0.1, dataset="mnist")
        config = json.loads((tmp_path / "m" / "config.json").read_text())
        config["norm"] = "linf"
        (tmp_path / "m" / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match="norm"):
            certnet.load(tmp_path / "m")
