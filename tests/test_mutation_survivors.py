"""Tests written against the mutants that survived ``scripts/mutation.sh`` (the list, with the
mutant each test kills and the equivalent ones, is tests/mutation/survivors.md). Each pins a
documented formula or contract that the rest of the suite only checked loosely: the rounding
and norm bounds are so generous on ordinary weights that a smaller (unsound) bound still
covered the errors the other tests measure."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import warnings
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import certnet.nn.spectral as spectral
from certnet import checkpoint
from certnet.errors import CheckpointError, UnsupportedLayerError
from certnet.floats import eta, gamma
from certnet.nn.layer_types import BY_CLASS, LayerType, layer_type, register_layer_type
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    batchnorm_affine,
)
from certnet.nn.rounding import (
    ERROR_SAFETY,
    RoundingBound,
    check_rounding,
    float64_forward,
    rounding_bound,
)
from certnet.nn.spectral import FLOAT64_UNIT_ROUNDOFF, dense_spectral_bound, magnitude_bound


def close(value: float, rel: float = 1e-15):
    """pytest.approx with no absolute tolerance (its default 1e-12 would swallow a rounding
    bound of 1e-15 whole)."""
    return pytest.approx(value, rel=rel, abs=0)


# --- certnet.nn.rounding ---------------------------------------------------------------------


def test_rounding_bound_is_the_documented_linear_form():
    """input ||x|| + output ||y|| + per_position sqrt(H W) + per_entry sqrt(C H W), per point,
    in float64 (H != W so that the positions are not mistaken for one spatial axis)."""
    x = torch.rand(3, 2, 4, 6, dtype=torch.float64) + 1
    y = torch.rand(3, 5, 4, 7, dtype=torch.float64) + 2
    bound = RoundingBound(input=0.25, output=0.125, per_position=3.0, per_entry=5.0)
    got = bound(x, y)
    want = (0.25 * x.flatten(1).norm(dim=1) + 0.125 * y.flatten(1).norm(dim=1)
            + 3.0 * math.sqrt(4 * 7) + 5.0 * math.sqrt(5 * 4 * 7))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


def test_rounding_bound_fixed_terms_alone_are_float64():
    x = torch.rand(2, 3, dtype=torch.float64)
    y = torch.rand(2, 4, dtype=torch.float64)
    got = RoundingBound(per_entry=1 / 3)(x, y)  # 1/3 is not a float32: a float32 full() shows
    assert got.dtype == torch.float64
    assert got.tolist() == [1 / 3 * math.sqrt(4)] * 2


@pytest.mark.parametrize("bias", [True, False])
def test_affine_rule_is_gamma_n_plus_1_times_magnitude_and_bias(bias):
    torch.manual_seed(0)
    layer = LipschitzLinear(7, 3, bias=bias).double()
    if bias:
        layer.bias.data = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)  # norm 13
    rule = rounding_bound(layer)
    g = gamma(7 + 1)
    assert float(rule.input) == close(g * float(magnitude_bound(layer.weight)),
                                              rel=1e-15)
    assert rule.per_position == close(g * 13.0 if bias else 0.0)
    assert rule.per_entry == (7 + 1) * eta()
    assert rule.output is None


def test_a_bias_that_swallows_the_product_is_covered():
    """fl(1 + 1e16) = 1e16: the error, 1, comes from the bias alone."""
    layer = LipschitzLinear(2, 1).double()
    layer.weight.data = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    layer.bias.data = torch.tensor([1e16], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lip = [dense_spectral_bound(layer.weight)]
    logits, error = float64_forward(nn.Sequential(layer), x, lip)
    exact = Fraction(1.0) + Fraction(1e16)
    assert abs(Fraction(float(logits[0, 0])) - exact) == 1
    assert float(error[0]) >= 1


def test_float64_forward_refuses_a_lipschitz_list_of_the_wrong_length():
    layers = nn.Sequential(LipschitzLinear(2, 2).double(), nn.ReLU(),
                           LipschitzLinear(2, 2).double())
    lip = [dense_spectral_bound(layers[0].weight), torch.tensor(1.0, dtype=torch.float64)]
    with pytest.raises(ValueError):  # a missing constant would drop a layer's error
        float64_forward(layers, torch.rand(2, 2, dtype=torch.float64), lip)


def test_errors_of_leading_exact_layers_are_float64():
    layers = nn.Sequential(nn.Flatten(), LipschitzLinear(4, 2).double())
    lip = [torch.tensor(1.0, dtype=torch.float64), dense_spectral_bound(layers[1].weight)]
    errors: list[torch.Tensor] = []
    float64_forward(layers, torch.rand(3, 1, 2, 2), lip, errors=errors)
    assert [e.dtype for e in errors] == [torch.float64, torch.float64]
    assert errors[0].tolist() == [0.0] * 3


def test_unsupported_layer_is_named():
    with pytest.raises(UnsupportedLayerError, match="^no rounding rule for layer Tanh$"):
        check_rounding(nn.Tanh())


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def test_a_registered_rounding_rule_is_used():
    def rule(layer: nn.Module) -> RoundingBound:
        return RoundingBound(per_entry=0.5)

    try:
        register_layer_type(LayerType(_Doubler, rounding=rule))
        assert layer_type(_Doubler()).rounding is rule
        logits, error = float64_forward(nn.Sequential(_Doubler()), torch.ones(2, 4),
                                        [torch.tensor(2.0, dtype=torch.float64)])
        assert error.tolist() == [0.5 * 2 * (1 + 1e-6)] * 2  # sqrt(4 entries), ERROR_SAFETY
    finally:
        BY_CLASS.pop(_Doubler, None)


def test_conv_rules_count_the_kernel_taps_and_the_residual_identity():
    torch.manual_seed(0)
    conv = LipschitzConv2d(2, 3, 3, padding=1).double()
    conv.bias.data = torch.tensor([0.0, 3.0, 4.0], dtype=torch.float64)
    rule = rounding_bound(conv)
    g = gamma(2 * 3 * 3 + 1)
    assert float(rule.input) == close(g * float(magnitude_bound(conv.weight)))
    assert rule.per_position == close(g * 5.0)
    assert rule.per_entry == (2 * 3 * 3 + 1) * eta()
    res = ResidualConv2d(2, 3, alpha=-0.5).double()
    rule = rounding_bound(res)
    g = gamma(2 * 3 * 3 + 3)
    assert float(rule.input) == close(
        g * float(magnitude_bound(res.kernel_majorant())))
    bias_norm = float(res.bias.detach().double().norm())
    assert rule.per_position == close(g * bias_norm)
    assert rule.per_entry == (2 * 3 * 3 + 3) * eta()


def test_normalize_rule_is_relative_to_the_output():
    rule = rounding_bound(Normalize([0.5], [0.25]))
    assert (rule.input, rule.output, rule.per_position, rule.per_entry) == \
        (None, 3 * FLOAT64_UNIT_ROUNDOFF, 0.0, 2 * eta())


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_rule_is_8u_of_the_affine_map(affine):
    bn = nn.BatchNorm2d(3, affine=affine).double().eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 3.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    if affine:
        bn.weight.data = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
        bn.bias.data = torch.tensor([0.5, 7.0, -1.0], dtype=torch.float64)
    scale, _ = batchnorm_affine(bn)
    beta = bn.bias.detach().double().abs() if affine else 0.0
    u8 = 8 * FLOAT64_UNIT_ROUNDOFF
    rule = rounding_bound(bn)
    assert float(rule.input) == u8 * float(scale.abs().max())
    assert rule.per_position == close(
        u8 * float(((bn.running_mean.double() * scale).abs() + beta).norm()))
    assert rule.per_entry == 8 * eta()
    assert rule.output is None


def test_float64_forward_reports_every_layer_in_float64_with_the_safety_factor():
    torch.manual_seed(0)
    layers = nn.Sequential(LipschitzLinear(3, 4).double(), nn.ReLU(),
                           LipschitzLinear(4, 2).double())
    lip = [dense_spectral_bound(layers[0].weight), torch.tensor(1.0, dtype=torch.float64),
           dense_spectral_bound(layers[2].weight)]
    x = torch.rand(5, 3)  # float32 in: the pass itself is float64
    outputs: list[torch.Tensor] = []
    errors: list[torch.Tensor] = []
    logits, error = float64_forward(layers, x, lip, outputs=outputs, errors=errors)
    assert logits.dtype == torch.float64 and len(outputs) == len(errors) == 3
    want = x.double()
    for layer, out in zip(layers, outputs, strict=True):
        want = layer(want)
        assert torch.equal(out, want)
    assert torch.equal(logits, want)
    # unrolled: e1 = r1, e2 = L2 e1, e3 = L3 e2 + r3, each reported times ERROR_SAFETY
    r1 = rounding_bound(layers[0])(x.double(), outputs[0])
    r3 = rounding_bound(layers[2])(outputs[1], outputs[2])
    e3 = lip[2] * r1 + r3
    torch.testing.assert_close(errors[0], r1 * ERROR_SAFETY, rtol=1e-15, atol=0)
    torch.testing.assert_close(errors[1], r1 * ERROR_SAFETY, rtol=1e-15, atol=0)
    torch.testing.assert_close(errors[2], e3 * ERROR_SAFETY, rtol=1e-15, atol=0)
    torch.testing.assert_close(error, e3 * ERROR_SAFETY, rtol=1e-15, atol=0)
    assert float(error.min()) > 0


# --- certnet.nn.spectral ---------------------------------------------------------------------


def test_non_finite_weights_guard_wraps_any_bound():
    """The guard is applied at import time; applying it here runs its code under test."""
    def bound(weight: torch.Tensor, scale: float) -> torch.Tensor:
        """doc"""
        return weight.abs().sum() * scale

    guarded = spectral._inf_for_non_finite_weights(bound)
    assert guarded.__name__ == "bound" and guarded.__doc__ == "doc"
    assert float(guarded(torch.tensor([1.0, -2.0]), 3.0)) == 9.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        got = guarded(torch.tensor([1.0, bad]), 3.0)
        assert got.dtype == torch.float64 and got.shape == () and float(got) == float("inf")


@pytest.mark.parametrize("axis", [0, 1])
def test_conv_bound_is_taken_on_the_documented_fft_grid(axis):
    """A difference kernel [1, -1] along one axis has the frequency response 1 - e^(-i theta),
    whose largest modulus on an n-point grid is 2 sin(pi floor(n/2) / n): 2 for an even n, less
    for an odd one. So the bound pins the grid, n = H + 2 padding + 2 (here 5 + 2 + 2 = 9, odd)
    vertically and W + 2 padding + 2 (6 + 2 + 2 = 10, even) horizontally; a non-square input
    catches a grid taken from the other axis."""
    kernel = torch.tensor([1.0, -1.0], dtype=torch.float64).view(1, 1, *((2, 1), (1, 2))[axis])
    hw = (5, 6)
    n = hw[axis] + 2 * 1 + 2
    want = 2 * math.sin(math.pi * (n // 2) / n) * (1 + spectral.BOUND_SLACK)
    got = spectral.conv_spectral_bound(kernel, 1, 1, hw)
    assert float(got) == close(want, rel=1e-12)


def test_dense_bound_switches_to_gram_iteration_only_above_the_threshold(monkeypatch):
    """[I_3 | 0] has three equal singular values: the exact SVD gives 1, the Gram iteration
    3^(1/512) (its Frobenius-norm slack), so the two paths are told apart."""
    monkeypatch.setattr(spectral, "EXACT_SVD_MAX_DIM", 3)
    rows = torch.eye(3, 5, dtype=torch.float64)
    assert float(spectral.dense_spectral_bound(rows)) == close(1 + 1e-9, rel=1e-12)
    monkeypatch.setattr(spectral, "EXACT_SVD_MAX_DIM", 2)
    assert float(spectral.dense_spectral_bound(rows)) == close(3 ** (1 / 512) * (1 + 1e-9),
                                                                        rel=1e-12)


def test_gram_bound_of_a_zero_matrix_is_a_float64_zero():
    got = spectral.gram_spectral_bound(torch.zeros(3, 4))
    assert got.dtype == torch.float64 and float(got) == 0.0


def test_magnitude_bound_sums_in_float64():
    """float32 weights: the row and column sums are taken in float64 (a float32 sum of 1 and
    1e4 tiny entries loses them all, far beyond BOUND_SLACK)."""
    w = torch.full((1, 10001), 2.0**-30, dtype=torch.float32)
    w[0, 0] = 1.0
    got = spectral.magnitude_bound(w)
    rows, cols = 1 + 10000 * 2.0**-30, 1.0
    assert got.dtype == torch.float64
    assert float(got) == close(math.sqrt(rows * cols) * (1 + 1e-9))


def test_conv_rules_of_a_single_output_channel():
    """The fan-in is the size of one output channel's kernel (weight[0]), which exists even for
    a single output channel."""
    conv = LipschitzConv2d(2, 1, 3, bias=False).double()
    assert rounding_bound(conv).per_entry == (2 * 3 * 3 + 1) * eta()
    res = ResidualConv2d(1, 3, bias=False).double()
    assert rounding_bound(res).per_entry == (1 * 3 * 3 + 3) * eta()


# --- certnet.checkpoint ----------------------------------------------------------------------


def _checkpoint(tmp_path):
    from certnet.archs import build_arch
    from certnet.methods.gloro import GloroNet

    model = GloroNet(build_arch("2c2f", (1, 28, 28), 10, seed=0), (1, 28, 28), 10)
    checkpoint.save_model(tmp_path / "m", model, eps=0.3, dataset="mnist")
    return tmp_path / "m"


def _rewrite_weights(path, blob: bytes) -> None:
    """New weights whose sha256 config.json names (model_sha256 is not in the sealed
    description)."""
    (path / "model.safetensors").write_bytes(blob)
    config = json.loads((path / "config.json").read_text())
    config["model_sha256"] = hashlib.sha256(blob).hexdigest()
    (path / "config.json").write_text(json.dumps(config))


def test_load_names_what_is_wrong_with_the_weights_file(tmp_path):
    path = _checkpoint(tmp_path)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:-1])
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match config\.json "
                       r"\(corrupt, truncated or from another checkpoint\)$"):
        checkpoint.load(path)
    _rewrite_weights(path, b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors "
                       "file: "):
        checkpoint.load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"/m/model\.safetensors is missing$"):
        checkpoint.load(path)


def test_weights_missing_a_layer_are_refused_by_the_dry_run(tmp_path):
    """The meta-device dry run is strict: a layer the weights lack is refused there (before a
    real, possibly huge, model is built), on one line that names the missing key."""
    path = _checkpoint(tmp_path)
    state = st_load((path / "model.safetensors").read_bytes())
    dropped = sorted(k for k in state if k.startswith("layers."))[-1]
    del state[dropped]
    _rewrite_weights(path, st_save(state))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value).startswith(f"{path}: the layers in config.json do not take the "
                                     "weights in model.safetensors: ")
    assert "\n" not in str(err.value) and str(err.value).endswith(
        f'Missing key(s) in state_dict: "{dropped.removeprefix("layers.")}".')


def test_training_state_errors_and_the_newest_state_wins(tmp_path):
    with pytest.raises(CheckpointError, match=r"^no training state to resume under .*/state$"):
        checkpoint.load_train_state(tmp_path)
    for epoch in (1, 2, 3):
        checkpoint.save_train_state(tmp_path, epoch, {"w": torch.full((2,), float(epoch))},
                                    {"note": epoch}, keep=3)
    tensors, meta = checkpoint.load_train_state(tmp_path)
    assert meta["epoch"] == 3 and tensors["w"].tolist() == [3.0, 3.0]
    newest = tmp_path / "state" / "epoch-0003"
    (newest / "state.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"^training state .*epoch-0003 is corrupt "
                       r"\(checksum mismatch\)$"):
        checkpoint.load_train_state(tmp_path)
    (newest / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"^training state .*epoch-0003 is unreadable: "):
        checkpoint.load_train_state(tmp_path)


def test_a_checkpoint_restores_its_method_options_without_warnings(tmp_path):
    from certnet.archs import build_arch
    from certnet.methods.gloro import GloroNet

    model = GloroNet(build_arch("2c2f", (1, 28, 28), 10, seed=0, activation="clipped-relu"),
                     (1, 28, 28), 10, power_iterations=3, lipschitz="local", sparsity=0.5,
                     local_iterations=4)
    checkpoint.save_model(tmp_path / "m", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "copying into a meta tensor is a no-op"
        loaded = checkpoint.load(tmp_path / "m")
    assert loaded.method_config() == model.method_config()
    assert (loaded.power_iterations, loaded.sparsity, loaded.local_iterations) == (3, 0.5, 4)


#: a one-layer GloRo net on 4 inputs: the smallest model a checkpoint can hold
TINY_LAYERS = [{"type": "linear", "in_features": 4, "out_features": 2, "bias": True}]


def _tiny_checkpoint(tmp_path, layers=None, method=None, **options):
    from certnet.methods.gloro import GloroNet
    from certnet.nn.spec import build_layers

    torch.manual_seed(0)
    method = method or GloroNet
    model = method(build_layers(layers or TINY_LAYERS, (4,)), (4,), 2, **options)
    checkpoint.save_model(tmp_path / "tiny", model)
    return tmp_path / "tiny"


def _edit_config(path, edit, seal: bool = True) -> None:
    """Apply ``edit`` to config.json; ``seal``: recompute description_sha256, as a forger (or
    a migration) would, so that only the check under test can refuse the edit."""
    config = json.loads((path / "config.json").read_text())
    edit(config)
    if seal:
        config["description_sha256"] = checkpoint.description_sha256(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("version", "numbers"), [
    ("0.1.0", (0, 1, 0)), ("1.22.3.4", (1, 22, 3)), ("1.2.dev0", (1, 2)), ("1.2.3rc1", (1, 2)),
    ("x", ()), (99, ()), (None, ()), (1.5, ())])
def test_version_tuple_reads_at_most_major_minor_patch_of_a_string(version, numbers):
    """A fourth part (a local build) is the same release; a pre-release part ends the numbers;
    a non-string (a hand-edited config.json) has none, so the schema, not the "newer"
    refusal, names it."""
    assert checkpoint._version_tuple(version) == numbers


def _cfg(path):
    return re.escape(str(path / "config.json"))


#: (edit of config.json, whether to reseal the description, the whole message as a regex of
#: the checkpoint directory D and its config.json C): one line naming the file and the field
READ_CONFIG_REFUSALS = {
    "no-config-json": (lambda p: (p / "config.json").unlink(), None, "{C} is missing"),
    "not-json": (lambda p: (p / "config.json").write_text("{"), None,
                 "{C} is not valid JSON: Expecting property name .*"),
    "not-a-config": (lambda p: (p / "config.json").write_text("[]"), None,
                     "{C} is not a certnet checkpoint config"),
    "newer-certnet": (lambda c: c.update(certnet_version="999.0.0"), True,
                      "{D} was written by certnet 999\\.0\\.0, newer than this certnet "
                      f"{re.escape(checkpoint.__version__)}; upgrade certnet to load it"),
    "version-not-a-string": (lambda c: c.update(certnet_version=99), True,
                             "{C}: field 'certnet_version': input should be a valid string "
                             "\\(got 99\\)"),
    "bad-option": (lambda c: c["method_config"].update(power_iterations="ten"), True,
                   "{C}: method_config: field 'power_iterations': input should be a valid "
                   "integer \\(got 'ten'\\)"),
    "format-2-lacks-an-option": (lambda c: c["method_config"].pop("loss"), True,
                                 "{C}: method_config: field 'loss': field required .*"),
    "bad-train-config": (lambda c: c.update(train={"bogus": 1}), False,
                         "{C}: train: field 'bogus': unknown key; .*"),
    "bad-layer-spec": (lambda c: c.update(layers=[{"type": "nope"}]), True,
                       "{C}: unknown layer spec \\{'type': 'nope'\\} at layer 0; .*"),
    "edited-description": (lambda c: c["method_config"].update(power_iterations=3), False,
                           "{C}: the model description \\(method, norm, input_shape, "
                           "num_classes, layers, method_config\\) does not match its "
                           "description_sha256: edited after saving"),
}


@pytest.mark.parametrize("case", list(READ_CONFIG_REFUSALS))
def test_read_config_refusals_name_the_file_and_the_field_once(tmp_path, case):
    edit, seal, message = READ_CONFIG_REFUSALS[case]
    path = _tiny_checkpoint(tmp_path)
    if seal is None:
        edit(path)
    else:
        _edit_config(path, edit, seal)
    with pytest.raises(CheckpointError) as err:
        checkpoint.read_config(path)
    want = message.replace("{C}", _cfg(path)).replace("{D}", re.escape(str(path)))
    assert re.fullmatch(want, str(err.value)), str(err.value)


@pytest.mark.parametrize("method_config", [None, {"power_iterations": 3}])
def test_a_format_1_checkpoint_loads_with_default_options(tmp_path, method_config):
    """Format 1 had no description_sha256, could omit ``norm`` and gave only some options
    (the rest take their defaults), or none."""
    from certnet.methods.gloro import GloroNet

    path = _tiny_checkpoint(tmp_path)

    def to_format_1(config):
        config["format_version"] = 1
        del config["description_sha256"], config["norm"], config["method_config"]
        if method_config is not None:
            config["method_config"] = method_config

    _edit_config(path, to_format_1, seal=False)
    model = checkpoint.load(path)
    defaults = GloroNet(checkpoint.build_layers(TINY_LAYERS, (4,)), (4,), 2).method_config()
    assert model.method_config() == {**defaults, **(method_config or {})}


def test_load_refuses_a_norm_the_method_does_not_certify(tmp_path):
    path = _tiny_checkpoint(tmp_path)
    _edit_config(path, lambda c: c.update(norm="linf"))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (f"{path}: config.json says norm 'linf', but a gloro model is "
                              "certified in l2")


def test_load_refuses_options_the_method_refuses(tmp_path):
    """Schema-valid options that the constructor refuses together (sparsity needs local
    bounds): the method's own message, first line, after the directory."""
    path = _tiny_checkpoint(tmp_path)
    _edit_config(path, lambda c: c["method_config"].update(sparsity=0.5))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (f"{path}: config.json describes no valid model: sparsity is a "
                              "local-Lipschitz penalty: use lipschitz=local")


def test_load_refuses_a_tensor_outside_the_layers(tmp_path):
    """The dry run checks the ``layers.`` tensors only; the model's strict load refuses any
    other tensor (the weights would not be the model's), naming it on one line."""
    path = _tiny_checkpoint(tmp_path)
    state = st_load((path / "model.safetensors").read_bytes())
    state["extra"] = torch.zeros(1)
    _rewrite_weights(path, st_save(state))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    cause = " ".join(str(err.value.__cause__).split())
    assert str(err.value) == (f"{path}: weights do not fit the architecture in config.json: "
                              f"{cause}")
    assert str(err.value).endswith('Unexpected key(s) in state_dict: "extra".')


def test_load_refuses_batchnorm_statistics_no_certifier_bounds(tmp_path):
    from certnet.methods.bound_prop import IBPNet

    layers = [{"type": "linear", "in_features": 4, "out_features": 3, "bias": True},
              {"type": "batchnorm1d", "num_features": 3}, {"type": "relu"},
              {"type": "linear", "in_features": 3, "out_features": 2, "bias": True}]
    path = _tiny_checkpoint(tmp_path, layers, IBPNet)
    state = st_load((path / "model.safetensors").read_bytes())
    state["layers.1.running_var"][0] = -1.0
    _rewrite_weights(path, st_save(state))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (f"{path}: layer 1 (BatchNorm1d): running_var has negative or "
                              "NaN entries")


def test_load_puts_the_model_on_the_device(tmp_path):
    """On a CPU-only machine the meta device stands in for a GPU."""
    model = checkpoint.load(_tiny_checkpoint(tmp_path), device="meta")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}
    assert not model.training


def test_the_dry_run_names_an_exception_without_a_message(tmp_path, monkeypatch):
    """Whatever the dry build raises is one line; an exception with no message (e.g. a bare
    MemoryError or AssertionError inside torch) is named by its type."""
    path = _tiny_checkpoint(tmp_path)

    def build(*args):
        raise MemoryError

    monkeypatch.setattr(checkpoint, "build_layers", build)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(err.value) == (f"{path}: the layers in config.json do not take the weights in "
                              "model.safetensors: MemoryError")


def test_save_train_state_makes_its_directory_and_replaces_a_state_of_the_same_epoch(
        tmp_path, monkeypatch):
    """The output directory need not exist; the temp directory is made beside the final one
    (a rename within one filesystem), wherever tempfile's default directory is."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no such dir"))
    run = tmp_path / "new" / "run"
    for value in (1.0, 2.0):
        final = checkpoint.save_train_state(run, 1, {"w": torch.full((2,), value)}, {})
        assert final == run / "state" / "epoch-0001"
    tensors, meta = checkpoint.load_train_state(run)
    assert tensors["w"].tolist() == [2.0, 2.0] and meta["epoch"] == 1
    assert sorted(p.name for p in (run / "state").iterdir()) == ["epoch-0001"]


def test_a_failed_train_state_write_leaves_nothing_and_raises_its_own_error(tmp_path,
                                                                            monkeypatch):
    checkpoint.save_train_state(tmp_path, 1, {"w": torch.ones(2)}, {})
    root = tmp_path / "state"

    def full(path, data):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "atomic_write", full)
        with pytest.raises(OSError, match="^disk full$"):
            checkpoint.save_train_state(tmp_path, 2, {"w": torch.ones(2)}, {})
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001"]
    # a failure after the rename (the directory's fsync): the temp directory is gone already,
    # and the fsync's error, not the cleanup's, is what the caller sees
    fsync_dir = checkpoint.fsync_dir

    def failing_fsync(path):
        if path == root:
            raise OSError("fsync failed")
        fsync_dir(path)

    monkeypatch.setattr(checkpoint, "fsync_dir", failing_fsync)
    with pytest.raises(OSError, match="^fsync failed$"):
        checkpoint.save_train_state(tmp_path, 2, {"w": torch.ones(2)}, {})
    assert checkpoint.load_train_state(tmp_path)[1]["epoch"] == 2
