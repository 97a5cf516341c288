"""What certnet refuses instead of certifying: models with fewer than two classes, BatchNorm
statistics whose affine map cannot be computed soundly in float64, layer spec fields outside
each layer type's schema; and what it converts rigorously instead (half-precision inputs) or
handles exactly (non-square conv stride and padding in the masked local bounds)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nets import random_cnn, random_mlp
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import certnet
from certnet.bounds.local import masked_bound
from certnet.certifiers import applicable, certify
from certnet.certifiers.base import CERTIFIERS, Certificate, Certifier
from certnet.errors import CheckpointError, ConfigError, UnsupportedLayerError
from certnet.methods import METHODS
from certnet.methods.bound_prop import CrownIBPNet, IBPNet
from certnet.methods.gloro import GloroNet
from certnet.nn.linf_dist import LinfDist, Negate
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, convert_sequential
from certnet.nn.spec import LAYER_TYPES, build_layers, describe_layers

MODELS = Path(__file__).resolve().parent.parent / "models"


def _resign(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["model_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(config))


def _edit(path: Path, change) -> None:
    """Apply ``change(config)`` to config.json in place."""
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path: Path, change) -> None:
    """Apply ``change(state)`` to model.safetensors and re-sign it (an attacker can)."""
    state = st_load((path / "model.safetensors").read_bytes())
    change(state)
    (path / "model.safetensors").write_bytes(st_save(state))
    _resign(path)


# -- 1. fewer than two classes ----------------------------------------------------------------
def _layers_with_outputs(method: str, outputs: int) -> nn.Sequential:
    """A tiny network on 4 inputs with ``outputs`` logits that ``method`` accepts."""
    if method == "gloro":
        return nn.Sequential(nn.Flatten(), LipschitzLinear(4, outputs))
    if method == "linf-dist":
        return nn.Sequential(nn.Flatten(), LinfDist(4, outputs, bias=True), Negate())
    return nn.Sequential(nn.Flatten(), nn.Linear(4, outputs))


@pytest.mark.parametrize("method", ["gloro", "ibp", "crown-ibp", "linf-dist"])
@pytest.mark.parametrize("num_classes,outputs", [(1, 1), (True, 1), (2.0, 2), (10.0, 10),
                                                 ("2", 2), (None, 2)])
def test_models_need_an_int_number_of_classes_of_at_least_two(method, num_classes, outputs):
    assert {"gloro", "ibp", "crown-ibp", "linf-dist"} <= set(METHODS)
    layers = _layers_with_outputs(method, outputs)
    with pytest.raises(ConfigError, match="num_classes"):
        METHODS[method](layers, (4,), num_classes)
    METHODS[method](_layers_with_outputs(method, 2), (4,), 2)  # two classes are fine


@pytest.fixture
def gloro_checkpoint(tmp_path):
    model = GloroNet(nn.Sequential(nn.Flatten(), LipschitzLinear(4, 6), nn.ReLU(),
                                   LipschitzLinear(6, 2)), (4,), 2).eval()
    path = tmp_path / "gloro"
    certnet.save_model(path, model)
    return path


def test_a_checkpoint_with_one_class_is_refused(gloro_checkpoint):
    def one_class(config):
        config["num_classes"] = 1
        config["layers"][-1]["out_features"] = 1

    def one_row(state):
        for key in ("layers.3.weight", "layers.3.bias"):
            state[key] = state[key][:1].contiguous()

    _edit(gloro_checkpoint, one_class)
    _edit_weights(gloro_checkpoint, one_row)
    with pytest.raises(CheckpointError, match="num_classes"):
        certnet.load(gloro_checkpoint)


@pytest.mark.parametrize("value", [2.0, True, "2"])
def test_a_checkpoint_with_a_non_int_number_of_classes_is_refused(gloro_checkpoint, value):
    _edit(gloro_checkpoint, lambda config: config.update(num_classes=value))
    with pytest.raises(CheckpointError, match="num_classes"):
        certnet.load(gloro_checkpoint)


# -- 2. BatchNorm statistics ------------------------------------------------------------------
def _bn_model(dtype: torch.dtype = torch.float32, **stats) -> IBPNet:
    """An IBP net with a BatchNorm1d whose first channel gets ``stats`` (running_var,
    running_mean, weight, bias: values; eps: the layer's eps)."""
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Flatten(), LipschitzLinear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                           LipschitzLinear(6, 3)).to(dtype)
    bn = layers[2]
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-0.1, 0.1)
    model = IBPNet(layers, (4,), 3).eval()
    with torch.no_grad():  # after construction, which runs the layers once
        for name, value in stats.items():
            if name == "eps":
                bn.eps = value
            else:
                getattr(bn, name)[0] = value
    return model


TINY = torch.finfo(torch.float64).tiny  # 2.2e-308, the smallest normal float64
BAD_BATCHNORM = {
    "var 0, eps 0": dict(running_var=0.0, eps=0.0),
    "var subnormal (float64), eps 0": (torch.float64, dict(running_var=1e-310, eps=0.0)),
    "var just under the smallest normal": (torch.float64,
                                           dict(running_var=math.nextafter(TINY, 0), eps=0.0)),
    "var + eps subnormal": (torch.float64, dict(running_var=1e-309, eps=1e-309)),
    "var inf": dict(running_var=math.inf),
    "var 1e308 + eps 1e308 overflows": (torch.float64, dict(running_var=1e308, eps=1e308)),
    "var NaN": dict(running_var=math.nan),
    "var negative": dict(running_var=-1.0),
    "var negative, var + eps positive": dict(running_var=-1e-6),
    "mean inf": dict(running_mean=math.inf),
    "mean NaN": dict(running_mean=math.nan),
    "weight NaN": dict(weight=math.nan),
    "weight inf": dict(weight=-math.inf),
    "bias inf": dict(bias=math.inf),
    "eps NaN": dict(eps=math.nan),
    "eps negative": dict(eps=-1e-5),
    "eps inf": dict(eps=math.inf),
    "eps a string": dict(eps="1e-5"),
    "scale overflows": (torch.float64, dict(running_var=1e-300, eps=0.0, weight=1e300)),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHNORM))
def test_batchnorm_without_a_sound_float64_affine_map_is_refused_by_every_certifier(case):
    dtype, stats = BAD_BATCHNORM[case] if isinstance(BAD_BATCHNORM[case], tuple) else \
        (torch.float32, BAD_BATCHNORM[case])
    model = _bn_model(dtype, **stats)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    for norm in ("linf", "l2"):
        names = [*applicable(model, norm), "best"]
        assert {"ibp", "crown"} <= set(names)
        for name in names:
            model._twins.clear()
            with pytest.raises(UnsupportedLayerError, match=r"layer 2 .*BatchNorm1d"):
                certify(model, x, 0.01, name, norm)


@pytest.mark.parametrize("dtype,var,eps", [
    (torch.float64, 1e-300, 0.0),  # normal: rsqrt is 1e150, computed to within an ulp
    (torch.float64, TINY, 0.0),  # the smallest normal float64
    (torch.float32, 1e-40, 0.0),  # a float32 subnormal: normal in the float64 twin
    (torch.float32, 0.0, 1e-5),
])
def test_batchnorm_statistics_with_a_normal_var_plus_eps_are_certified(dtype, var, eps):
    model = _bn_model(dtype, running_var=var, eps=eps)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    for name in [*applicable(model, "linf"), "best"]:
        cert = certify(model, x, 0.01, name, "linf")
        assert len(cert.pred) == 3


@pytest.mark.parametrize("key,value", [("running_var", -1.0), ("running_var", math.nan),
                                       ("running_var", math.inf), ("running_mean", math.nan),
                                       ("weight", math.inf), ("bias", math.nan)])
def test_a_checkpoint_with_degenerate_batchnorm_statistics_is_refused(tmp_path, key, value):
    model = _bn_model()
    path = tmp_path / "bn"
    certnet.save_model(path, model)

    def poison(state):
        state[f"layers.2.{key}"][0] = value

    _edit_weights(path, poison)
    with pytest.raises(CheckpointError, match="BatchNorm1d"):
        certnet.load(path)


# -- 3. half-precision inputs -----------------------------------------------------------------
class _RecordDtype(Certifier):
    name = "record-dtype"

    def __init__(self) -> None:
        self.seen: list[torch.dtype] = []

    def applies(self, model, norm):
        return None

    def certify(self, model, x, threat):
        self.seen.append(x.dtype)
        pred = torch.zeros(len(x), dtype=torch.long)
        return Certificate.eps_or_nothing(pred, torch.zeros(len(x), dtype=torch.float64),
                                          threat.eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_certifier_receives_its_batch_in_float64(monkeypatch, dtype):
    recorder = _RecordDtype()
    monkeypatch.setitem(CERTIFIERS, recorder.name, recorder)
    model = _bn_model()
    x = torch.rand(3, 4).to(dtype)
    certify(model, x, 0.01, recorder.name)
    assert recorder.seen == [torch.float64]


def _small_models() -> list:
    shape = (1, 4, 4)
    mlp = random_mlp(3, 16, [8, 8], "relu", 3, gain=2.0)
    cnn = random_cnn(4, shape, [2, 4], "relu", 3, gain=2.0)
    return [GloroNet(convert_sequential(cnn, shape), shape, 3).eval(),
            GloroNet(convert_sequential(mlp, shape), shape, 3).eval(),
            IBPNet(mlp, shape, 3).eval(), CrownIBPNet(cnn, shape, 3).eval()]


def _same(a: Certificate, b: Certificate) -> bool:
    return torch.equal(a.pred, b.pred) and torch.equal(a.certified, b.certified) and \
        torch.equal(a.radius, b.radius) and a.by == b.by and \
        (a.margin is None) == (b.margin is None) and \
        (a.margin is None or torch.equal(a.margin, b.margin))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_get_exactly_the_certificates_of_their_values(half):
    seen = set()
    for model in _small_models():
        x = torch.rand(6, *model.input_shape, generator=torch.Generator().manual_seed(2))
        x = x.to(half)
        for norm in ("linf", "l2"):
            for name in [*applicable(model, norm), "best"]:
                seen.add(name)
                low = certify(model, x, 0.05, name, norm)
                assert _same(low, certify(model, x.double(), 0.05, name, norm)), name
                assert _same(low, certify(model, x.float(), 0.05, name, norm)), name
    assert {"lipschitz", "ibp", "crown", "local-lipschitz"} <= seen


# -- 4. layer spec schemas --------------------------------------------------------------------
LINEAR = {"type": "linear", "in_features": 4, "out_features": 2, "bias": True}
CONV = {"type": "conv", "in_channels": 1, "out_channels": 2, "kernel_size": 3, "stride": 1,
        "padding": 1, "bias": True}
BAD_SPECS = {  # name -> (specs, input shape, field the error names)
    "device kwarg": ([{"type": "flatten"}, {**LINEAR, "device": "meta"}], (4,), "device"),
    "dtype kwarg": ([{"type": "flatten"}, {**LINEAR, "dtype": "float64"}], (4,), "dtype"),
    "conv dilation": ([{**CONV, "dilation": 2}, {"type": "flatten"}], (1, 4, 4), "dilation"),
    "conv padding mode": ([{**CONV, "padding_mode": "circular"}], (1, 4, 4), "padding_mode"),
    "batchnorm eps": ([{"type": "batchnorm1d", "num_features": 4, "eps": -1.0}], (4,), "eps"),
    "batchnorm affine": ([{"type": "batchnorm1d", "num_features": 4, "affine": False}], (4,),
                         "affine"),
    "flatten start_dim": ([{"type": "flatten", "start_dim": 0}, LINEAR], (4,), "start_dim"),
    "bool for int": ([{"type": "flatten"}, {**LINEAR, "in_features": True, "out_features": 2}],
                     (1,), "in_features"),
    "int for bool": ([{"type": "flatten"}, {**LINEAR, "bias": 1}], (4,), "bias"),
    "float for int": ([{"type": "flatten"}, {**LINEAR, "out_features": 2.0}], (4,),
                      "out_features"),
    "list for int": ([{**CONV, "kernel_size": [3, 3]}], (1, 4, 4), "kernel_size"),
    "nested mean": ([{"type": "normalize", "mean": [[0.5]], "std": [0.5]}], (1, 2, 2), "mean"),
    "string std": ([{"type": "normalize", "mean": [0.5], "std": ["0.5"]}], (1, 2, 2), "std"),
    "NaN std": ([{"type": "normalize", "mean": [0.5], "std": [math.nan]}], (1, 2, 2), "std"),
    "dict alpha": ([{"type": "residual_conv", "channels": 1, "kernel_size": 3,
                     "alpha": {"a": 1}, "bias": True}], (1, 4, 4), "alpha"),
    "string momentum": ([{"type": "flatten"}, {"type": "mean_shift", "num_features": 4,
                                               "momentum": "0.1"}], (4,), "momentum"),
    "bool p": ([{"type": "flatten"}, {"type": "linf_dist", "in_features": 4, "out_features": 2,
                                      "p": True, "bias": False}], (4,), "p"),
    "nested shape": ([{"type": "flatten"}, {"type": "clipped_relu", "shape": [[4]]}], (4,),
                     "shape"),
    "pool kernel of three": ([{"type": "avgpool", "kernel_size": [2, 2, 2], "stride": 2,
                               "padding": 0}], (1, 4, 4), "kernel_size"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_layer_spec_fields_outside_the_schema_are_refused(case):
    specs, shape, field = BAD_SPECS[case]
    index = next(i for i, s in enumerate(specs) if field in s)
    kind = specs[index]["type"]
    with pytest.raises(ConfigError, match=rf"layer {index} \({kind}\).*'{field}[.']"):
        build_layers(specs, shape)


def test_a_layer_type_without_a_schema_takes_no_fields():
    with pytest.raises(ConfigError, match=r"layer 0 \(relu\).*'inplace'"):
        build_layers([{"type": "relu", "inplace": True}], (4,))


#: one spec per registered layer type, with the input shape it takes
SAMPLES = {
    "conv": (CONV, (1, 4, 4)),
    "residual_conv": ({"type": "residual_conv", "channels": 2, "kernel_size": 3, "alpha": 0.5,
                       "bias": False}, (2, 4, 4)),
    "linear": (LINEAR, (4,)),
    "normalize": ({"type": "normalize", "mean": [0.25, 0.5], "std": [0.75, 2.0]}, (2, 3, 3)),
    "batchnorm2d": ({"type": "batchnorm2d", "num_features": 2}, (2, 3, 3)),
    "batchnorm1d": ({"type": "batchnorm1d", "num_features": 4}, (4,)),
    "avgpool": ({"type": "avgpool", "kernel_size": [2, 1], "stride": 2, "padding": [1, 0]},
                (1, 4, 4)),
    "maxpool": ({"type": "maxpool", "kernel_size": 3, "stride": [2, 1], "padding": 1,
                 "dilation": 1}, (1, 5, 5)),
    "leaky_relu": ({"type": "leaky_relu", "negative_slope": 0.25}, (4,)),
    "linf_dist": ({"type": "linf_dist", "in_features": 4, "out_features": 3, "p": "inf",
                   "bias": True}, (4,)),
    "linf_dist_conv": ({"type": "linf_dist_conv", "in_channels": 1, "out_channels": 2,
                        "kernel_size": 3, "stride": 1, "padding": 1, "p": 8.0, "bias": False},
                       (1, 4, 4)),
    "mean_shift": ({"type": "mean_shift", "num_features": 4, "momentum": 0.1}, (4,)),
    "negate": ({"type": "negate"}, (4,)),
    "tanh": ({"type": "tanh"}, (4,)),
    "relu": ({"type": "relu"}, (4,)),
    "minmax": ({"type": "minmax"}, (4,)),
    "clipped_relu": ({"type": "clipped_relu", "shape": [4]}, (4,)),
    "clipped_minmax": ({"type": "clipped_minmax", "shape": [4]}, (4,)),
    "flatten": ({"type": "flatten"}, (4,)),
    "reshape": ({"type": "reshape", "shape": [2, 1, 2]}, (4,)),
    "identity": ({"type": "identity"}, (4,)),
}


@pytest.mark.parametrize("kind", sorted(LAYER_TYPES))
def test_every_layer_type_round_trips_through_its_schema(kind):
    spec, shape = SAMPLES[kind]
    described = describe_layers(build_layers([spec], shape))
    assert json.loads(json.dumps(described)) == [spec]
    assert describe_layers(build_layers(described, shape)) == described


@pytest.mark.parametrize("directory", sorted(p.parent.name for p in MODELS.glob("*/config.json")))
def test_every_stored_model_loads(directory):
    model = certnet.load(MODELS / directory)
    assert model.num_classes == 10


# -- 5. masked conv bounds with non-square stride and padding --------------------------------
def _dense(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """The convolution on one point of ``shape`` as a dense float64 matrix (out, in)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    columns = F.conv2d(basis, conv.weight.detach().double(), None, conv.stride, conv.padding)
    return columns.reshape(n, -1).T


@pytest.mark.parametrize("stride,padding", [((2, 1), (1, 0)), ((1, 2), (0, 1)),
                                            ((2, 2), (1, 1))])
def test_masked_conv_bound_reads_both_stride_and_padding_entries(stride, padding):
    torch.manual_seed(0)
    conv = LipschitzConv2d(2, 3, 3)
    conv.stride, conv.padding = stride, padding  # set after construction, which wants squares
    shape = (2, 7, 6)
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, *shape)).shape[1:]
    dense = _dense(conv, shape)
    g = torch.Generator().manual_seed(1)
    rows = torch.rand(5, *out_shape, generator=g) < 0.15
    cols = torch.rand(5, *shape, generator=g) < 0.15
    bound = masked_bound(conv, rows, cols, None)
    assert bound is not None and bool(torch.isfinite(bound).all())
    for i in range(5):
        masked = rows[i].flatten().double()[:, None] * dense * cols[i].flatten().double()
        exact = torch.linalg.matrix_norm(masked, ord=2)
        frobenius = torch.linalg.matrix_norm(masked)
        assert exact <= bound[i] <= frobenius * (1 + 1e-9), (i, exact, bound[i], frobenius)


def test_certifiers_refuse_a_conv_whose_stride_was_made_non_square():
    shape = (1, 4, 4)
    model = GloroNet(convert_sequential(random_cnn(4, shape, [2, 4], "relu", 3), shape),
                     shape, 3).eval()
    conv = model.layers[2]  # kernel 2, stride 2 on 5 x 5: a 2 x 2 output, as with these
    conv.stride, conv.padding = (2, 3), (0, 1)
    x = torch.rand(2, *shape)
    for name in ("lipschitz", "local-lipschitz", "ibp", "crown"):
        model._twins.clear()
        with pytest.raises(UnsupportedLayerError, match="layer 2 .*square"):
            certify(model, x, 0.01, name, "linf")
