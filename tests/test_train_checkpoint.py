"""Trainer, checkpoint round trip, resume determinism, config handling."""

import json
from pathlib import Path

import pytest
import torch

import certnet
from certnet.checkpoint import atomic_write, load, read_config, save_model
from certnet.data.augment import crop_flip
from certnet.errors import CheckpointError, ConfigError, TrainingError
from certnet.schedules import Ramp
from certnet.train import TrainConfig, Trainer, build_model, has_resumable_state

SMALL = dict(epochs=2, train_limit=1024, eval_limit=256, batch_size=128, eps=0.3,
             eps_train_factor=1.5)


def _train(out: Path, **kw) -> Trainer:
    trainer = Trainer(TrainConfig(**{**SMALL, **kw}), out, progress=False)
    trainer.fit()
    return trainer


def test_train_writes_checkpoint_metrics_and_loads(tmp_path, mnist_available):
    trainer = _train(tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert {"test_clean", "test_vra", "train_loss"} <= set(json.loads(lines[-1]))
    model = certnet.load(tmp_path / "run")
    x = trainer.test_data.images(slice(64))
    a = trainer.model.eval().certify(x, 0.3)
    b = model.certify(x, 0.3)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.certified, b.certified)
    assert torch.allclose(a.radius, b.radius)
    config = read_config(tmp_path / "run")
    assert config["method"] == "gloro" and config["eps"] == 0.3 and config["epoch"] == 2
    assert config["data_checksum"] and config["certnet_version"] == certnet.__version__


def test_resume_is_bitwise_identical(tmp_path, mnist_available):
    full = _train(tmp_path / "full", epochs=3)
    interrupted = tmp_path / "interrupted"
    cfg = TrainConfig(**{**SMALL, "epochs": 3})
    Trainer(cfg, interrupted, progress=False).fit(stop_after=2)
    states = sorted((interrupted / "state").glob("epoch-*"))
    assert [p.name for p in states] == ["epoch-0001"]  # only the newest state is kept
    resumed = Trainer(cfg, interrupted, resume=True, progress=False)
    assert resumed.start_epoch == 2
    assert read_config(interrupted)["epoch"] == 2
    resumed.fit()
    for (k, a), (_, b) in zip(full.model.state_dict().items(),
                              resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_monitoring_evaluations_use_an_even_subset_and_the_last_all(tmp_path, mnist_available):
    trainer = _train(tmp_path / "run", eval_every=1, monitor_limit=100)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    # 256 test points, every 3rd for monitoring: 86; the last epoch certifies all 256
    assert [json.loads(line)["test_n"] for line in lines] == [86, 256]
    assert trainer.report.n == 256
    assert torch.equal(trainer.monitor_data.y, trainer.test_data.y[::3])
    assert {"data", "train", "evaluate", "checkpoint"} <= set(trainer.phases.seconds)
    with pytest.raises(ConfigError, match="monitor_limit"):
        TrainConfig(**{**SMALL, "monitor_limit": -1})


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_its_checkpoint(tmp_path,
                                                                         mnist_available):
    trainer = Trainer(TrainConfig(**{**SMALL, "epochs": 3}), tmp_path / "run", progress=False)
    trainer.fit(stop_after=1)
    loss = trainer.model.loss

    def diverging(x, y, eps, **kw):
        value, stats = loss(x, y, eps, **kw)
        return value * float("nan"), stats

    trainer.model.loss = diverging  # a NaN loss: NaN gradients, NaN weights after the step
    trainer.loss = diverging
    with pytest.raises(TrainingError, match="after epoch 2.*checkpoint of epoch 1 is kept"):
        trainer.fit()
    assert has_resumable_state(tmp_path / "run")
    assert [json.loads(line)["epoch"] for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, mnist_available):
    _train(tmp_path / "run", epochs=1)
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "run", progress=False)


def test_resume_with_a_different_config_is_refused(tmp_path, mnist_available):
    _train(tmp_path / "run", epochs=1)
    with pytest.raises(ConfigError, match="differs"):
        Trainer(TrainConfig(**{**SMALL, "epochs": 1, "lr": 0.5}), tmp_path / "run",
                resume=True, progress=False)
    # settings outside training (evaluation, device) may change
    changed = {**SMALL, "epochs": 1, "eval_every": 0, "eval_limit": 7, "device": "cpu"}
    assert Trainer(TrainConfig(**changed), tmp_path / "run", resume=True,
                   progress=False).start_epoch == 1


def test_resume_of_a_run_that_predates_a_config_field(tmp_path, mnist_available):
    """A field missing from the saved config means the run used its default."""
    _train(tmp_path / "run", epochs=1)
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    del config["train"]["precision"]
    path.write_text(json.dumps(config))
    assert Trainer(TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "run", resume=True,
                   progress=False).start_epoch == 1
    with pytest.raises(ConfigError, match="precision"):
        Trainer(TrainConfig(**{**SMALL, "epochs": 1, "precision": "bfloat16"}),
                tmp_path / "run", resume=True, progress=False)


def _saved(tmp_path):
    from certnet.archs import build_arch
    from certnet.methods.gloro import GloroNet

    model = GloroNet(build_arch("2c2f", (1, 28, 28), 10, seed=0), (1, 28, 28), 10)
    save_model(tmp_path / "m", model, eps=0.3, dataset="mnist")
    return model, tmp_path / "m"


def test_checkpoint_round_trip_is_exact(tmp_path):
    model, path = _saved(tmp_path)
    loaded = load(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_checkpoint_detects_tampered_weights(tmp_path):
    _, path = _saved(tmp_path)
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="does not match"):
        load(path)


def test_checkpoint_from_newer_version_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["certnet_version"] = "99.0.0"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer"):
        load(path)


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    atomic_write(target, "old")

    def boom(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.json"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"nope": 1})
    with pytest.raises(ConfigError):
        TrainConfig(augment="mixup")
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps: [unclosed")
    with pytest.raises(ConfigError, match="YAML"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError):
        Ramp.parse({"shape": "zigzag"})


@pytest.mark.parametrize("name, value, ok", [
    ("epochs", 3, True), ("epochs", 3.0, False), ("epochs", True, False), ("epochs", "3", False),
    ("eps", 1, True), ("eps", 0.5, True), ("eps", "0.3", False), ("eps", False, False),
    ("eval_limit", None, True), ("eval_limit", 5, True), ("eval_limit", 2.5, False),
    ("data_dir", None, True), ("data_dir", 3, False), ("method", None, False),
    ("method_kwargs", {"loss": "ce"}, True), ("method_kwargs", ["ce"], False),
    ("eps_schedule", {"start": 0.5}, True),
])
def test_config_field_types(name, value, ok):
    if ok:
        TrainConfig(**{name: value})
    else:
        with pytest.raises(ConfigError, match=f"^field '{name}': "):
            TrainConfig(**{name: value})


def test_config_kwargs_are_checked_against_the_method_and_arch():
    with pytest.raises(ConfigError, match=r"'power_iteration': unknown key.*allowed: \[.*"
                                          r"'power_iterations'"):
        TrainConfig(method_kwargs={"power_iteration": 10})
    with pytest.raises(ConfigError, match="arch_kwargs"):
        TrainConfig(arch_kwargs={"num_classes": 5})  # certnet passes that one itself
    TrainConfig(method_kwargs={"power_iterations": 3, "loss": "trades"},
                arch_kwargs={"activation": "relu"})


def test_presets_parse():
    for preset in (Path(certnet.__file__).parent / "configs").glob("*.yaml"):
        TrainConfig.from_yaml(preset)


@pytest.mark.parametrize("preset", ["gloro-local-mnist-1.58-4c3f", "gloro-local-cifar10-0.141-6c2f",
                                    "gloro-local-mnist-1.58-2c2f-cpu",
                                    "gloro-mnist-1.58-2c2f-crelu-cpu"])
def test_local_lipschitz_presets_build_their_models(preset):
    config = TrainConfig.from_yaml(Path(certnet.__file__).parent / "configs" / f"{preset}.yaml")
    shape = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[config.dataset]
    model = build_model(config, shape, 10)
    assert model.lipschitz == config.method_kwargs["lipschitz"]
    assert model.default_certifier == ("local-lipschitz" if model.lipschitz == "local"
                                       else "lipschitz")


@pytest.mark.parametrize("preset", ["crown-ibp-cifar10-2-255-dm-large",
                                    "crown-ibp-cifar10-8-255-dm-large",
                                    "ibp-cifar10-2-255-cnn7", "ibp-cifar10-8-255-cnn7"])
def test_cifar_bound_presets_normalise_inside_the_model(preset):
    """CROWN-IBP's and Shi et al.'s CIFAR-10 inputs are normalised: the Normalize layer comes
    first, so eps and the [0, 1] box stay in pixels, and the interval bounds pass through it."""
    from certnet.nn.lipschitz import Normalize

    config = TrainConfig.from_yaml(Path(certnet.__file__).parent / "configs" / f"{preset}.yaml")
    model = build_model(config, (3, 32, 32), 10)
    assert type(model.layers[0]) is Normalize
    x = torch.rand(2, 3, 32, 32)
    loss, stats = model.loss(x, torch.tensor([0, 1]), config.eps, **{
        k: v(0.3) for k, v in config.loss_schedules.items()})
    assert torch.isfinite(loss) and stats["robust"].shape == (2,)


def test_ramp_shapes():
    assert Ramp(1, 0.001, 0.5, 1.0, "exp")(0.25) == 1
    assert Ramp(1, 0.001, 0.5, 1.0, "exp")(1.0) == pytest.approx(0.001)
    assert Ramp(1, 0.001, 0.5, 1.0, "exp")(0.75) == pytest.approx(0.001 ** 0.5)
    assert Ramp(0.0, 1.0, 0, 1, "linear")(0.3) == pytest.approx(0.3)
    log = Ramp(0.01, 1.0, 0, 0.5, "log")
    assert log(0) == pytest.approx(0.01) and log(0.5) == pytest.approx(1.0)
    assert log(0.1) > 0.01 + (1 - 0.01) * 0.2  # log ramp rises faster than linear early


def test_crop_flip_keeps_shape_and_content():
    x = torch.rand(16, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    assert all(torch.equal(o, a) or torch.equal(o, a.flip(2)) for o, a in zip(out, x, strict=True))
    assert crop_flip(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_same_seed_same_metrics(tmp_path, mnist_available):
    def metrics(out):
        _train(out, epochs=1)
        record = json.loads((out / "metrics.jsonl").read_text())
        for timing in ("train_seconds", "eval_seconds"):
            record.pop(timing)
        return record

    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_unknown_loss_schedule_is_refused(tmp_path, mnist_available):
    with pytest.raises(ConfigError, match="trades_lamda"):
        Trainer(TrainConfig(**{**SMALL, "loss_schedules": {"trades_lamda": 1.0}}),
                tmp_path / "run", progress=False)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_trains_resumes_and_certifies_in_float64(tmp_path, mnist_available,
                                                                 precision):
    """Autocast changes training only: the loss is computed in the low precision, the
    checkpoint and its certificate (float64 copy, sound bounds) are as for any model, and a
    float16 run's loss scale survives a resume."""
    config = TrainConfig(arch="2c2f", epochs=2, batch_size=64, train_limit=192, eval_limit=30,
                         eval_every=0, precision=precision)
    seen = []
    trainer = Trainer(config, tmp_path / "run", progress=False)
    original = trainer.model.loss

    def spy(x, y, eps, **kw):
        loss, stats = original(x, y, eps, **kw)
        seen.append(trainer.model(x).dtype)
        return loss, stats

    trainer.loss = spy
    trainer.fit(stop_after=1)
    assert set(seen) == {getattr(torch, precision)}
    again = Trainer(config, tmp_path / "run", resume=True, progress=False)
    if precision == "float16":
        assert again.scaler.get_scale() == trainer.scaler.get_scale()
    again.fit()
    model = load(tmp_path / "run")
    cert = model.certify(again.test_data.images(), 0.3)
    assert cert.radius.dtype == torch.float32 and bool(torch.isfinite(cert.radius).all())


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="int8")


def test_interval_training_without_an_eps_ramp_is_warned_about(tmp_path, mnist_available):
    """--method ibp without a preset trained at full eps from step one and collapsed to one
    class (the first-hour report): the Trainer says so and how to ramp."""
    import warnings

    base = {"method": "ibp", "arch": "dm-small", "eps": 0.1, "epochs": 1, "train_limit": 64}
    with pytest.warns(UserWarning, match="ramp it"):
        Trainer(TrainConfig(**base), tmp_path / "a", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(TrainConfig(**base, eps_schedule={"start": 0.0, "end": 1.0, "shape": "linear"}),
                tmp_path / "b", progress=False)


def test_a_state_half_written_by_a_killed_process_is_cleaned_up(tmp_path):
    """A hard kill mid-write leaves state/.epoch-*; the next save removes it (one writer)."""
    from certnet.checkpoint import save_train_state

    stale = tmp_path / "state" / ".epoch-abc123"
    stale.mkdir(parents=True)
    (stale / "state.safetensors").write_bytes(b"half")
    save_train_state(tmp_path, 0, {"w": torch.zeros(2)}, {})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["epoch-0000"]
