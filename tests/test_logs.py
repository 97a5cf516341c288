"""What `certnet train` writes to a log: one line per epoch and one summary, no progress-bar
noise when the output is not a terminal; --quiet keeps only the summary."""

import os
import subprocess
import sys

from certnet.cli import main

TRAIN = ["train", "--epochs", "2", "--train-limit", "512", "--eval-limit", "200"]


def _check_summary(lines: list[str], out: str) -> None:
    assert lines[-2].startswith("gloro/lipschitz l2 eps=0.3 n=200: clean accuracy")
    assert lines[-1].endswith(f"are in {out}")
    assert sum("points/s" in line for line in lines) == 1


def test_train_log_has_one_line_per_epoch(tmp_path, mnist_available):
    out = str(tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "certnet.cli", *TRAIN, "--out", out],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "\r" not in done.stdout and "it/s" not in done.stdout
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("epoch 1/2  eps 0.300  loss ") and lines[0].endswith(" s")
    assert lines[1].startswith("epoch 2/2") and "test clean" in lines[1] and "VRA" in lines[1]
    _check_summary(lines, out)


def test_quiet_train_prints_only_the_summary(tmp_path, capsys, mnist_available):
    out = str(tmp_path / "run")
    assert main([*TRAIN, "--epochs", "1", "--quiet", "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 2
    _check_summary(lines, out)
