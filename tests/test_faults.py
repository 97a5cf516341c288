"""Faults: a training run killed (SIGKILL or SIGTERM) mid-way and resumed with --resume ends
bitwise identical to an uninterrupted run with the same seed (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from certnet import checkpoint
from certnet.train import TrainConfig, Trainer, has_resumable_state

ARGS = ["train", "--arch", "2c2f", "--dataset", "mnist", "--eps", "0.3", "--epochs", "4",
        "--train-limit", "3072", "--eval-limit", "100", "--batch-size", "64", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "certnet.cli", *ARGS, "--out", str(out),
                           *extra], env=ENV, capture_output=True, text=True, timeout=600)


def _interrupt(out: Path, sig: int, ready: Path) -> tuple[int, str]:
    """Start a training run and send ``sig`` once ``ready`` exists (the run directory is
    created when training starts, ``state/epoch-NNNN`` with each checkpoint)."""
    # a shell without job control starts background jobs with SIGINT ignored, and Python
    # keeps an ignored SIGINT ignored: give the child the default disposition back
    proc = subprocess.Popen([sys.executable, "-m", "certnet.cli", *ARGS, "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_bitwise_identical(tmp_path, sig, mnist_available):
    reference = tmp_path / "reference"
    assert _run(reference).returncode == 0
    victim = tmp_path / "victim"
    # somewhere in epoch 3 (or while writing its checkpoint)
    returncode, err = _interrupt(victim, sig, victim / "state" / "epoch-0001")
    if sig == signal.SIGTERM:
        assert returncode == 130 and "continue with --resume" in err
    assert not list(victim.glob(".*.tmp")), "interrupted writes left temp files"
    resumed = subprocess.run([sys.executable, "-m", "certnet.cli", "train", "--resume", "--out",
                              str(victim), "--quiet"], env=ENV, capture_output=True, text=True,
                             timeout=600)  # the saved config is the default on resume
    assert resumed.returncode == 0, resumed.stderr
    ref, got = _weights(reference), _weights(victim)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    lines = (victim / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_sigint_stops_training_with_a_consistent_checkpoint(tmp_path, mnist_available):
    out = tmp_path / "run"
    returncode, err = _interrupt(out, signal.SIGINT, out / "state" / "epoch-0000")
    assert returncode == 130 and "continue with --resume" in err
    checkpoint.load(out)  # the checkpoint on disk is complete and consistent


def test_interrupt_before_the_first_checkpoint_says_nothing_was_saved(tmp_path,
                                                                      mnist_available):
    out = tmp_path / "run"
    returncode, err = _interrupt(out, signal.SIGTERM, out)
    assert returncode == 130 and not has_resumable_state(out)
    assert err.strip() == ("error: interrupted before the first checkpoint; nothing was saved: "
                           "run the same command again (with or without --resume)")
    Trainer(TrainConfig(train_limit=64, eval_limit=64), out, progress=False)  # not refused
    assert Trainer(TrainConfig(train_limit=64, eval_limit=64), out, resume=True,
                   progress=False).start_epoch == 0  # --resume starts it afresh


def test_failing_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch,
                                                         mnist_available):
    config = TrainConfig(epochs=2, train_limit=512, eval_limit=64, batch_size=128)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    trainer.fit(stop_after=1)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        trainer.fit()
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert checkpoint.read_config(tmp_path / "run")["epoch"] == 1
    checkpoint.load(tmp_path / "run")
