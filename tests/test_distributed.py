"""Distributed training under torchrun (2 CPU processes, gloo): the same weights and metrics as
one process with the same global batch and seed, for every method; a killed 2-process run
resumes to the same result; distributed certify equals one process."""

from __future__ import annotations

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

from certnet.checkpoint import load
from certnet.data import load_dataset
from certnet.distributed import World

COMMON = """\
dataset: mnist
epochs: 2
batch_size: 64
train_limit: 289
eval_limit: 40
eval_every: 0
optimizer: sgd
optimizer_kwargs: {momentum: 0.9}
lr: 0.05
seed: 3
"""
#: Every method, small: its method / arch lines.
METHODS = {
    "gloro": "method: gloro\narch: 2c2f\neps: 0.3\n",
    "ibp": "method: ibp\narch: dm-small\neps: 0.1\n",
    "crown-ibp": "method: crown-ibp\narch: dm-small\neps: 0.1\n"
                 "loss_schedules: {kappa: 0.5, beta: 0.5}\n",
    "linf-dist": "method: linf-dist\narch: linf-dist-mlp\neps: 0.1\n"
                 "arch_kwargs: {depth: 3, width: 32}\n",  # mean shift: synchronised
    "ibp-batchnorm": "method: ibp\narch: dm-small\neps: 0.1\n"
                     "arch_kwargs: {batchnorm: true}\n",  # BatchNorm: synchronised
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args: list[str], cwd: Path, processes: int = 1) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def train(tmp_path: Path, out: str, processes: int, *extra: str, method: str = "gloro"
          ) -> Path:
    (tmp_path / "cfg.yaml").write_text(METHODS[method] + COMMON)
    run(["-m", "certnet.cli", "train", "--config", "cfg.yaml", "--out", out, "--quiet", *extra],
        tmp_path, processes)
    return tmp_path / out


def same_run(a: Path, b: Path, functional: bool = False) -> None:
    """Same weights (relative norm 1e-3: summation orders differ, and in CROWN-IBP a tie in a
    ReLU relaxation's slope can flip and move one weight by ~1e-4) or, with ``functional``,
    the same logits on test images (a bias feeding a BatchNorm has no effect, and its
    gradient is pure rounding noise); the same epoch metrics (relative 1e-5; 1e-4 with
    ``functional``: channels_last convolutions round differently on a half batch, and IBP
    through BatchNorm amplifies it: 9e-6 and 2.7e-4 on the logits, measured. Unsynchronised
    BatchNorm statistics miss both bounds by far: losses 6e-4 and 1e-3 apart, logits 3.3e-2)."""
    if functional:
        x = load_dataset("mnist", "test").images(slice(64))
        with torch.no_grad():
            la, lb = (load(d).eval()(x) for d in (a, b))
        assert float((la - lb).norm()) <= 1e-3 * float(la.norm())
    else:
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert sorted(wa) == sorted(wb)
        for k in wa:
            gap = float((wa[k].double() - wb[k].double()).norm())
            assert gap <= 1e-3 * float(wa[k].double().norm()) + 1e-6, (k, gap)
    ma = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "train_clean", "train_vra_estimate"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4 if functional else 1e-5,
                                            abs=1e-6), key


def test_shards_cover_the_batch_once():
    batch = torch.arange(33)
    parts = [batch[World(r, 4).shard(batch)] for r in range(4)]
    assert torch.equal(torch.cat(parts), batch) and {len(p) for p in parts} == {8, 9}
    assert World().shard(batch) == slice(0, 33)


@pytest.mark.usefixtures("mnist_available")
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "linf-dist", "ibp-batchnorm"])
def test_two_processes_train_every_method_like_one(tmp_path, method):
    # IBP through BatchNorm at lr 0.05, eps 0.1 is chaotic (loss ~600): rounding decides
    calm = ("--lr", "0.005", "--eps", "0.01") if "batchnorm" in method else ()
    same_run(train(tmp_path, "one", 1, *calm, method=method),
             train(tmp_path, "two", 2, *calm, method=method), functional="batchnorm" in method)


@pytest.mark.usefixtures("mnist_available")
def test_two_processes_train_like_one_and_resume(tmp_path):
    one = train(tmp_path, "one", 1)
    two = train(tmp_path, "two", 2)
    same_run(one, two)  # uneven last batch (289 = 4 x 64 + 33): shards of 17 and 16
    assert json.loads((two / "results.json").read_text())["n"] == 40
    # killed (SIGTERM to torchrun) once its first checkpoint exists, then resumed
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "certnet.cli", "train", "--config", "cfg.yaml",
                "--out", "resumed", "--quiet"]
    proc = subprocess.Popen(launcher, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "resumed" / "state").glob("epoch-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    train(tmp_path, "resumed", 2, "--resume")
    same_run(two, tmp_path / "resumed")


@pytest.mark.usefixtures("mnist_available")
def test_distributed_certify_equals_one_process(tmp_path):
    """torchrun certify: each rank certifies its share, rank 0 writes one report with the
    per-point results of a single process (101 points: shares of 51 and 50)."""
    out = train(tmp_path, "model", 1)
    for processes, name in ((1, "one"), (2, "two")):
        run(["-m", "certnet.cli", "certify", str(out), "--limit", "101", "--batch-size", "16",
             "--json", f"{name}.json", "--per-point", f"{name}.csv"], tmp_path, processes)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("n", "clean_accuracy", "vra", "abstain_rate", "radius_quantiles"):
        assert one[key] == two[key], key
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "two.csv").read_text()
