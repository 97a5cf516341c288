"""config.json is untrusted input (issue 24 §3): every field of real checkpoints is mutated —
type changes, out-of-range values, missing, extra and nested garbage — and each load is a
clean one-line refusal or the very same model (weights, layers, options, certifier), whose
certificates are then unchanged; never a traceback."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certnet.checkpoint import load
from certnet.cli import main
from certnet.data import load_dataset
from certnet.errors import CertnetError
from certnet.methods import METHODS
from certnet.nn.spec import describe_layers

MODELS = Path(__file__).resolve().parent.parent / "models"
#: one committed checkpoint per method family: GloRo (conv), IBP (conv + dense), l_inf-dist
CHECKPOINTS = ["gloro-mnist-0.3-2c2f", "ibp-mnist-0.3-dm-medium-cpu",
               "linf-dist-mnist-0.3-mlp5-w512-cpu"]
#: the training record, the same schema in every checkpoint, is mutated in the cheapest one
RECORDS = ("train", "last_metrics")
#: numbers whose every finite value is a valid (different) model: only non-finite ones are
#: out of range there
FREE_NUMBERS = {"mean", "std", "alpha", "p", "momentum"}
MISSING = object()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), parents first."""
    children = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    out = []
    for key, child in children:
        out.append((*prefix, key))
        out += _paths(child, (*prefix, key))
    return out


def _get(config: Any, path: tuple) -> Any:
    for key in path:
        config = config[key]
    return config


def _mutated(config: dict, path: tuple, new: Any) -> dict:
    """A copy of ``config`` with the value at ``path`` replaced (removed for MISSING)."""
    copy = json.loads(json.dumps(config))
    parent = _get(copy, path[:-1])
    if new is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


def _replacements(value: Any, field: Any) -> list[Any]:
    """Values of another JSON type than ``value``, and out-of-range ones of its own type."""
    wrapped: list[Any] = [None, [value], {"value": value}, str(value)]
    if type(value) is bool:
        return [*wrapped, int(value), float(value)]
    if type(value) is int:
        return [*wrapped, float(value), True, -1, 0, 2**64, -(2**64), 10**400]
    if type(value) is float:
        out_of_range = [] if field in FREE_NUMBERS else [-1.0, 0.0, 1e308, -1e308]
        return [*wrapped, True, math.nan, math.inf, -math.inf, *out_of_range]
    if type(value) is str:
        return [None, [value], {"value": value}, 0, True, "", value + "\x00garbage"]
    return [None, "garbage", 0, [] if isinstance(value, dict) else {}, [[[{"a": [None]}]]]]


def _mutations(config: dict, records: bool) -> list[tuple[str, tuple, Any]]:
    out = [("extra top-level key", ("zz_extra",), 1)]
    for path in _paths(config):
        if path[0] in RECORDS and len(path) > 1 and not records:
            continue
        value, field = _get(config, path), path[-1]
        out.append(("missing", path, MISSING))
        out += [("replaced", path, new) for new in _replacements(value, field)]
        if isinstance(value, dict):
            out.append(("extra key", (*path, "zz_extra"), {"nested": [1, "x"]}))
    return out


def _identity(model) -> dict[str, Any]:
    """Everything a certificate depends on."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "layers": describe_layers(model.layers), "options": model.method_config(),
            "method": model.method, "norm": model.norm, "shape": model.input_shape,
            "classes": model.num_classes, "certifier": model.default_certifier}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    states = a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    return states and all(a[k] == b[k] for k in a if k != "state")


def _write(directory: Path, source: Path, config: dict) -> Path:
    directory.mkdir()
    os.symlink(source / "model.safetensors", directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))  # NaN/Infinity as Python writes
    return directory


def _certificates(model, eps: float) -> tuple[torch.Tensor, ...]:
    x = load_dataset("mnist", "test").images(slice(0, 16))
    cert = model.certify(x, eps)
    return cert.pred, cert.certified, cert.radius


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_every_field_mutated_is_refused_cleanly_or_changes_nothing(name, tmp_path,
                                                                   mnist_available):
    source = MODELS / name
    config = json.loads((source / "config.json").read_text())
    model = load(source)
    original, certificates = _identity(model), _certificates(model, config["eps"])
    loaded = refused = 0
    for i, (kind, path, new) in enumerate(_mutations(config, name == CHECKPOINTS[0])):
        directory = _write(tmp_path / str(i), source, _mutated(config, path, new)
                           if kind != "extra top-level key" else {**config, "zz_extra": new})
        try:
            model = load(directory)
        except CertnetError as err:  # anything else fails the test with its traceback
            assert str(err) and "\n" not in str(err), (kind, path, new, err)
            refused += 1
            continue
        if not _same(_identity(model), original):  # e.g. more power iterations: same bounds
            assert all(map(torch.equal, _certificates(model, config["eps"]), certificates)), \
                (kind, path, new)
        loaded += 1
    assert refused > loaded > 0  # metadata edits load; the model-defining ones do not


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_garbage_through_the_cli_never_gives_a_traceback_or_another_certificate(
        data, tmp_path_factory, capsys, mnist_available):
    name = data.draw(st.sampled_from(CHECKPOINTS))
    source = MODELS / name
    config = json.loads((source / "config.json").read_text())
    path = data.draw(st.sampled_from(_paths(config)))
    garbage = data.draw(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                    max_size=3), max_leaves=6))
    directory = _write(tmp_path_factory.mktemp("fuzz") / "ckpt", source,
                       _mutated(config, path, garbage))
    code = main(_certify(directory, config["eps"]))
    err = capsys.readouterr().err.strip()
    if code == 0:
        got = (directory / "points.csv").read_text()
        assert got == _reference(name, config["eps"], tmp_path_factory, capsys), (path, garbage)
    else:
        assert code == 2 and err.startswith("error: ") and "\n" not in err, (path, garbage, err)


def _certify(directory: Path, eps: float) -> list[str]:
    """``certnet certify`` of the first 16 test points at ``eps``, per point to points.csv."""
    return ["certify", str(directory), "--limit", "16", "--eps", str(eps), "--per-point",
            str(directory / "points.csv")]


_REFERENCES: dict[str, str] = {}


def _reference(name: str, eps: float, tmp_path_factory, capsys) -> str:
    """The per-point certificates of the unmodified checkpoint (computed once)."""
    if name not in _REFERENCES:
        directory = _write(tmp_path_factory.mktemp("reference") / "ckpt", MODELS / name,
                           json.loads((MODELS / name / "config.json").read_text()))
        assert main(_certify(directory, eps)) == 0
        capsys.readouterr()
        _REFERENCES[name] = (directory / "points.csv").read_text()
    return _REFERENCES[name]


def test_a_checkpoint_names_every_option_of_its_method():
    """format 2 requires a complete method_config: what each method saves is its schema."""
    for cls in set(METHODS.values()):
        assert set(cls.options_schema().model_fields) == set(cls.options_schema(True)
                                                             .model_fields)
    for name in CHECKPOINTS:
        model = load(MODELS / name)
        assert set(model.method_config()) == set(model.options_schema().model_fields)


def test_format_1_checkpoints_load_with_default_options_and_no_seal(tmp_path):
    config = json.loads((MODELS / CHECKPOINTS[0] / "config.json").read_text())
    original = _identity(load(MODELS / CHECKPOINTS[0]))
    legacy = {k: v for k, v in config.items() if k != "description_sha256"}
    legacy["format_version"] = 1
    legacy["method_config"] = {"power_iterations": 10, "loss": "ce"}  # as certnet 0.1.0 wrote
    assert _same(_identity(load(_write(tmp_path / "v1", MODELS / CHECKPOINTS[0], legacy))),
                 original)
    legacy["format_version"] = 2  # a format-2 checkpoint must name every option, and be sealed
    with pytest.raises(CertnetError, match="method_config: field 'lipschitz': field required"):
        load(_write(tmp_path / "v2", MODELS / CHECKPOINTS[0], legacy))


def test_a_dropped_layer_that_still_fits_the_weights_is_refused_by_the_seal(tmp_path):
    config = json.loads((MODELS / CHECKPOINTS[0] / "config.json").read_text())
    minmax = next(i for i, s in enumerate(config["layers"]) if s["type"] == "minmax")
    config["layers"][minmax] = {"type": "identity"}  # same weights, another function
    with pytest.raises(CertnetError, match="does not match its description_sha256"):
        load(_write(tmp_path / "ckpt", MODELS / CHECKPOINTS[0], config))
