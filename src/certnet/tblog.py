"""TensorBoard scalars of a training run (``certnet train --tensorboard DIR``): each epoch's
``metrics.jsonl`` record, the same dict, one double-precision scalar per number at step = the
epoch (1-based). A resumed run purges the steps from its checkpointed epoch on (events a killed
run wrote after it) and logs that epoch's saved record again, so the scalars always mirror
metrics.jsonl."""

from __future__ import annotations

import os
from numbers import Real
from pathlib import Path
from typing import Any

from certnet.errors import ConfigError

#: metrics.jsonl key -> TensorBoard tag; any other number (scheduled loss weights, a model's
#: own schedule values) is logged as ``schedule/<key>``.
TAGS = {"train_loss": "train/loss", "train_clean": "train/clean_accuracy",
        "train_vra_estimate": "train/vra_estimate", "test_clean": "test/clean_accuracy",
        "test_vra": "test/vra", "test_abstain": "test/abstain_rate", "test_n": "test/n",
        "eps_train": "schedule/eps", "lr": "schedule/lr",
        "train_seconds": "time/train_seconds", "eval_seconds": "time/eval_seconds"}


def _summary_writer() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a ConfigError naming the extra to install."""
    try:
        import tensorboard  # noqa: F401  (torch's module may be imported while this is gone)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                          "'certnet[tensorboard]'") from err
    return SummaryWriter


def check_log_dir(log_dir: str | Path, fresh: bool) -> None:
    """ConfigError, before any work, if TensorBoard logging into ``log_dir`` would fail: the
    package missing (checked first), the directory not creatable or not writable, or, for a
    ``fresh`` run (one not resuming a checkpoint), the directory already holding event files."""
    _summary_writer()
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--tensorboard {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--tensorboard {path}: cannot write into {existing} (not a "
                          "writable folder); nothing was computed")
    if fresh and path.is_dir() and any(path.glob("events.out.tfevents.*")):
        raise ConfigError(f"--tensorboard {path} already holds TensorBoard events of another "
                          "run: choose an empty folder (--resume of that run continues them)")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard tags and values of a metrics.jsonl record: every number but the epoch
    (booleans and strings such as p = "inf" are left out)."""
    return {TAGS.get(key, f"schedule/{key}"): value for key, value in record.items()
            if key != "epoch" and isinstance(value, Real) and not isinstance(value, bool)}


class EpochLog:
    """Writes epoch records into ``log_dir``; the event file is opened on the first record
    (a run stopped before its first checkpoint leaves none) with ``purge_step=first_step``:
    TensorBoard then discards the steps >= ``first_step`` of earlier files."""

    def __init__(self, log_dir: str | Path, first_step: int) -> None:
        self.log_dir = Path(log_dir)
        self.purge_step = first_step
        self.writer: Any = None

    def write(self, record: dict[str, Any]) -> None:
        """Log ``record`` (a metrics.jsonl record) at step ``record["epoch"]`` and flush."""
        if self.writer is None:
            self.writer = _summary_writer()(str(self.log_dir), purge_step=self.purge_step)
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
        self.writer.flush()
        self.purge_step = step + 1  # a reopened writer purges nothing logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
