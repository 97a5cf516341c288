"""The bad-input catalogue: every case raises a typed certnet error in Python and, on the CLI,
prints one line ``error: ...``, exits non-zero and writes no partial output.

A new case is one line in ``PY_CASES``, ``CHECKPOINT_CASES`` or ``CLI_CASES``."""

import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

import certnet
from certnet.archs import build_arch
from certnet.cli import main
from certnet.device import resolve_device
from certnet.errors import CheckpointError, ConfigError, DataError, InputError
from certnet.methods.gloro import GloroNet
from certnet.train import TrainConfig

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def model():
    return GloroNet(build_arch("2c2f", SHAPE, 10, seed=0), SHAPE, 10).eval()


def _x(**kw):
    return torch.rand(4, *SHAPE, **kw)


def _with(value, index=(0, 0, 0, 0)):
    x = _x()
    x[index] = value
    return x


PY_CASES = {
    "wrong shape": (InputError, lambda m: m.certify(torch.rand(4, 28, 28), 0.3)),
    "wrong channels": (InputError, lambda m: m.certify(torch.rand(4, 3, 28, 28), 0.3)),
    "integer dtype": (InputError, lambda m: m.certify(torch.zeros(4, *SHAPE, dtype=torch.long),
                                                      0.3)),
    "float8 dtype": (InputError, lambda m: m.certify(_x().to(torch.float8_e4m3fn), 0.3)),
    "not a tensor": (InputError, lambda m: m.certify([[0.5]], 0.3)),
    "NaN pixel": (InputError, lambda m: m.certify(_with(math.nan), 0.3)),
    "Inf pixel": (InputError, lambda m: m.certify(_with(math.inf), 0.3)),
    "pixel above 1": (InputError, lambda m: m.certify(_with(1.5), 0.3)),
    "pixel below 0": (InputError, lambda m: m.certify(_with(-0.1), 0.3)),
    "empty batch": (InputError, lambda m: m.certify(torch.rand(0, *SHAPE), 0.3)),
    "negative eps": (InputError, lambda m: m.certify(_x(), -0.1)),
    "NaN eps": (InputError, lambda m: m.certify(_x(), math.nan)),
    "inf eps": (InputError, lambda m: m.certify(_x(), math.inf)),
    "boolean eps": (InputError, lambda m: m.certify(_x(), True)),
    "unknown certifier": (ConfigError, lambda m: m.certify(_x(), 0.3, "nope")),
    "unknown norm": (ConfigError, lambda m: m.certify(_x(), 0.3, norm="l3")),
    "norm as certifier": (ConfigError, lambda m: m.certify(_x(), 0.3, "linf")),
    "unknown arch": (ConfigError, lambda m: build_arch("9c9f", SHAPE, 10)),
    "unknown method": (ConfigError, lambda m: certnet.methods.get_method("nope")),
    "unknown dataset": (ConfigError, lambda m: certnet.data.load_dataset("nope")),
    "unknown split": (ConfigError, lambda m: certnet.data.load_dataset("mnist", "dev")),
    "missing data dir": (DataError, lambda m: certnet.data.load_dataset(
        "mnist", data_dir="/nonexistent/dir")),
    "missing checkpoint": (CheckpointError, lambda m: certnet.load("/nonexistent/ckpt")),
    "unknown device": (ConfigError, lambda m: resolve_device("foo")),
    "missing CUDA device": (ConfigError, lambda m: resolve_device("cuda:99")),
    "misspelled method kwarg": (ConfigError, lambda m: TrainConfig(
        method_kwargs={"power_iteration": 10})),
    "misspelled arch kwarg": (ConfigError, lambda m: TrainConfig(arch_kwargs={"activations": 1})),
    "boolean epochs": (ConfigError, lambda m: TrainConfig(epochs=True)),
    "text eps": (ConfigError, lambda m: TrainConfig(eps="0.3")),
}


@pytest.mark.parametrize("name", sorted(PY_CASES))
def test_python_case(name, model):
    error, call = PY_CASES[name]
    with pytest.raises(error):
        call(model)


def _resign(path: Path) -> None:
    """Make config.json vouch for whatever model.safetensors now holds (an attacker can)."""
    config = json.loads((path / "config.json").read_text())
    config["model_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "config.json").write_text(json.dumps(config))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "certnet-pickle-executed"


def _pickle_renamed(path: Path) -> None:
    (path / "model.safetensors").write_bytes(pickle.dumps({"weights": Evil()}))
    _resign(path)


def _truncate(path: Path) -> None:
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[: len(blob) // 2])


def _garble_weights(path: Path) -> None:
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[:8] = b"\xff" * 8  # header length field
    (path / "model.safetensors").write_bytes(bytes(blob))
    _resign(path)


def _other_arch(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    config["layers"][-1]["in_features"] = 50
    config["layers"][-3]["out_features"] = 50
    (path / "config.json").write_text(json.dumps(config))


CHECKPOINT_CASES = {
    "truncated weights": _truncate,
    "truncated weights, re-signed": lambda p: (_truncate(p), _resign(p)),
    "garbled weights": _garble_weights,
    "missing weights": lambda p: (p / "model.safetensors").unlink(),
    "missing config": lambda p: (p / "config.json").unlink(),
    "garbled config": lambda p: (p / "config.json").write_text("{not json"),
    "config not an object": lambda p: (p / "config.json").write_text("[1, 2]"),
    "foreign config": lambda p: (p / "config.json").write_text('{"model_type": "bert"}'),
    "config lacks layers": lambda p: _drop(p, "layers"),
    "newer certnet": lambda p: _edit_config(p, certnet_version="99.0.0"),
    "newer format": lambda p: _edit_config(p, format_version=99),
    "different architecture": _other_arch,
    "unknown method in config": lambda p: _edit_config(p, method="nope"),
    "norm in config disagrees with the model": lambda p: _edit_config(p, norm="linf"),
    "pickle renamed to .safetensors": _pickle_renamed,
    "num_classes a float": lambda p: _edit_config(p, num_classes=10.0),
    "layer spec with a device": lambda p: _edit_layer(p, -1, device="meta"),
    "layer spec with an int bias": lambda p: _edit_layer(p, 0, bias=1),
}


def _edit_layer(path: Path, index: int, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config["layers"][index].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _drop(path: Path, key: str) -> None:
    config = json.loads((path / "config.json").read_text())
    del config[key]
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def checkpoint(tmp_path, model):
    path = tmp_path / "ckpt"
    certnet.save_model(path, model, eps=0.3, dataset="mnist")
    return path


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_checkpoint_case(name, checkpoint, tmp_path, capsys):
    MARKER.unlink(missing_ok=True)
    CHECKPOINT_CASES[name](checkpoint)
    with pytest.raises((CheckpointError, ConfigError)):
        certnet.load(checkpoint)
    out = tmp_path / "out.json"
    assert main(["certify", str(checkpoint), "--json", str(out), "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists()
    assert not MARKER.exists(), "a pickle payload was executed"


def test_dataset_labels_out_of_range(tmp_path):
    import numpy as np

    from certnet.data.dataset import to_dataset

    with pytest.raises(DataError, match="labels"):
        to_dataset("x", np.zeros((2, 1, 2, 2), np.uint8), np.array([0, 10]), 10, "sum")


def test_failing_write_keeps_previous_output_and_says_so(checkpoint, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "info.json"
    out.write_text("previous")

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("certnet.checkpoint.os.replace", disk_full)
    assert main(["certify", str(checkpoint), "--json", str(out), "--limit", "5"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "intact" in err
    assert out.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


TRAIN = ["train", "--out", "{tmp}/out"]
#: name -> (argv, text the one-line error must contain). "{tmp}" is a scratch directory,
#: "{ckpt}" a checkpoint trained on mnist, "yaml:TEXT" a config file holding TEXT.
CLI_CASES = {
    "missing checkpoint": (["certify", "/nonexistent/run"], "not a checkpoint directory"),
    "info of a missing checkpoint": (["info", "/nonexistent/run"], "not a checkpoint directory"),
    "unknown preset": (["train", "--config", "no-such-preset", "--out", "x"], "unknown preset"),
    "misspelled preset": (["train", "--config", "gloro-mnist-0.3-2c2ff", "--out", "x"],
                          "did you mean 'gloro-mnist-0.3-2c2f'"),
    "json into a missing folder": (["certify", "{ckpt}", "--json", "{tmp}/no/such/r.json"],
                                   "cannot write into"),
    "per-point csv is a folder": (["certify", "{ckpt}", "--per-point", "{tmp}"], "is a folder"),
    "curve into a missing folder": (["certify", "{ckpt}", "--curve", "{tmp}/no/c.png"],
                                    "nothing was computed"),
    "curve in an unknown format": (["certify", "{ckpt}", "--curve", "{tmp}/c.jpg"],
                                   "the suffix must be one of .png, .pdf, .svg"),
    "tensorboard under a file": ([*TRAIN, "--tensorboard", "{ckpt}/config.json/tb"],
                                "cannot write into"),
    "unknown arch": ([*TRAIN, "--arch", "nope"], "unknown architecture"),
    "unknown method": ([*TRAIN, "--method", "nope"], "unknown method"),
    "unknown dataset": ([*TRAIN, "--dataset", "nope"], "unknown dataset"),
    "train on an unknown device": ([*TRAIN, "--device", "foo"], "unknown device 'foo'"),
    "train on a missing GPU": ([*TRAIN, "--device", "cuda:99"], "'cuda:99'"),
    "certify on an unknown device": (["certify", "{ckpt}", "--device", "foo"], "unknown device"),
    "attack on a missing GPU": (["attack", "{ckpt}", "--device", "cuda:99"], "'cuda:99'"),
    "misspelled method_kwargs key": ([*TRAIN, "--config", "yaml:method_kwargs: "
                                      "{power_iteration: 10}"], "'power_iterations'"),
    "misspelled arch_kwargs key": ([*TRAIN, "--config", "yaml:arch_kwargs: {activations: relu}"],
                                   "'activations': unknown key (did you mean 'activation'?)"),
    "unknown method in YAML": ([*TRAIN, "--config", "yaml:method: glorot"], "unknown method"),
    "epochs as a word": ([*TRAIN, "--config", "yaml:epochs: one"],
                         "'epochs': input should be a valid integer"),
    "quoted eps": ([*TRAIN, "--config", 'yaml:eps: "0.3"'],
                   "'eps': input should be a valid number"),
    "fractional batch size": ([*TRAIN, "--config", "yaml:batch_size: 2.5"],
                              "'batch_size': input should be a valid integer"),
    "boolean epochs": ([*TRAIN, "--config", "yaml:epochs: true"],
                       "'epochs': input should be a valid integer"),
    "kwargs not a mapping": ([*TRAIN, "--config", "yaml:method_kwargs: [1]"],
                             "should be an object"),
    "certify another dataset": (["certify", "{ckpt}", "--dataset", "fashion-mnist"],
                                "--allow-dataset-mismatch"),
    "attack another dataset": (["attack", "{ckpt}", "--dataset", "fashion-mnist"],
                               "trained on mnist, not fashion-mnist"),
    "unknown certifier": (["certify", "{ckpt}", "--certifier", "crown-ibpp"],
                          "unknown certifier 'crown-ibpp'"),
    "attack with an unknown certifier": (["attack", "{ckpt}", "--certifier", "nope"],
                                         "unknown certifier"),
    "misspelled method arg": ([*TRAIN, "--method-arg", "los=trades"], "'loss'"),
    "misspelled arch arg": ([*TRAIN, "--arch-arg", "activations=relu"],
                            "allowed: ['activation']"),
    "method arg of another method": ([*TRAIN, "--method", "ibp", "--arch", "dm-small",
                                      "--method-arg", "loss=trades"], "loss"),
}


def _argv(argv: list[str], tmp: Path, ckpt: Path) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("yaml:"):
            path = tmp / f"config-{len(out)}.yaml"
            path.write_text(arg[5:] + "\n")
            arg = str(path)
        out.append(arg.replace("{tmp}", str(tmp)).replace("{ckpt}", str(ckpt)))
    return out


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_case(name, checkpoint, tmp_path, capsys):
    argv, message = CLI_CASES[name]
    argv = _argv(argv, tmp_path, checkpoint)
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert captured.out == ""
    assert sorted(tmp_path.rglob("*")) == before, "partial output was written"
