"""`certnet train --tensorboard DIR`: the scalars are metrics.jsonl's numbers, a resume does not
duplicate steps, and a missing package or an unwritable folder is refused before any work.

Read back with the accumulator the TensorBoard server itself uses (plugin_event_accumulator):
the legacy EventAccumulator shows double-precision scalars only as tensors and ignores purges of
them."""

import json
import sys
from pathlib import Path

import pytest

from certnet.cli import main
from certnet.config import TrainConfig
from certnet.train import Trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.plugin_event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from tensorboard.util import tensor_util  # noqa: E402

from certnet.tblog import scalars  # noqa: E402

SMALL = dict(method="gloro", arch="2c2f", dataset="mnist", eps=0.3, batch_size=128,
             train_limit=256, eval_limit=50, eval_every=1)
TRAIN = ["train", "--method", "gloro", "--arch", "2c2f", "--dataset", "mnist", "--eps", "0.3",
         "--batch-size", "128", "--train-limit", "256", "--eval-limit", "50", "--eval-every",
         "1", "--quiet"]


def _events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged steps gone)."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                  for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_mirror(out: Path, log_dir: Path) -> None:
    """Every number of every metrics.jsonl record is a scalar at its epoch, once, equal."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in _metrics(out):
        for tag, value in scalars(record).items():
            expected.setdefault(tag, []).append((record["epoch"], value))
    assert _events(log_dir) == expected


def test_scalars_are_the_metrics_jsonl_numbers(tmp_path, mnist_available):
    out, log_dir = tmp_path / "run", tmp_path / "tb" / "run"
    assert main([*TRAIN, "--epochs", "2", "--out", str(out),
                 "--tensorboard", str(log_dir)]) == 0
    _check_mirror(out, log_dir)
    tags = set(_events(log_dir))
    assert {"train/loss", "train/clean_accuracy", "train/vra_estimate", "schedule/eps",
            "schedule/lr", "time/train_seconds", "test/clean_accuracy", "test/vra",
            "test/abstain_rate"} <= tags
    assert [step for step, _ in _events(log_dir)["test/vra"]] == [1, 2]
    # a logging choice: the checkpoint's config (and its seal) does not mention it
    assert "tensorboard" not in json.dumps(json.loads((out / "config.json").read_text()))


def test_resume_continues_without_duplicate_steps(tmp_path, mnist_available):
    out, log_dir = tmp_path / "run", tmp_path / "tb"
    config = TrainConfig(**SMALL, epochs=3)
    Trainer(config, out, progress=False, tensorboard=log_dir).fit(stop_after=1)
    assert [step for step, _ in _events(log_dir)["train/loss"]] == [1]
    # what a killed run may leave: events after its last checkpoint (epoch 1)
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as stale:
        for step in (1, 2):
            stale.add_scalar("train/loss", 123.0, step, new_style=True, double_precision=True)
    Trainer(config, out, resume=True, progress=False, tensorboard=log_dir).fit()
    assert [step for step, _ in _events(log_dir)["train/loss"]] == [1, 2, 3]
    _check_mirror(out, log_dir)


def test_missing_package_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    monkeypatch.setattr("certnet.train.load_dataset", _no_work)
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "pip install 'certnet[tensorboard]'" in err
    assert list(tmp_path.iterdir()) == []


def _no_work(*args, **kwargs):
    raise AssertionError("the data was loaded before the output check")


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` not writable, even for root (who may write anywhere)."""
    import os

    access = os.access
    monkeypatch.setattr("certnet.tblog.os.access",
                        lambda path, mode: Path(path) != folder and access(path, mode))


@pytest.mark.parametrize("case, message", [
    ("parent is a file", "cannot write into"),
    ("read-only folder", "cannot write into"),
    ("folder is a file", "is a file, not a folder"),
    ("events of another run", "already holds TensorBoard events"),
])
def test_unusable_folder_is_refused_before_training(case, message, tmp_path, monkeypatch,
                                                    capsys):
    monkeypatch.setattr("certnet.train.load_dataset", _no_work)
    log_dir = tmp_path / "tb"
    if case == "parent is a file":
        (tmp_path / "file").write_text("")
        log_dir = tmp_path / "file" / "tb"
    elif case == "read-only folder":
        (tmp_path / "ro").mkdir()
        _read_only(monkeypatch, tmp_path / "ro")
        log_dir = tmp_path / "ro" / "a" / "tb"
    elif case == "folder is a file":
        log_dir.write_text("")
    else:
        log_dir.mkdir()
        (log_dir / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run"),
                 "--tensorboard", str(log_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert sorted(tmp_path.rglob("*")) == before
