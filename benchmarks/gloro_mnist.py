"""Benchmark GloRo on MNIST: clean accuracy, VRA, train s/epoch, certify s per 10k, peak memory.

Trains a preset (or reuses a finished run with ``--run``; the run's own s/epoch is in its
``metrics.jsonl``, and a clean s/epoch is timed here over ``--timing-steps`` training steps),
certifies the 10k MNIST test points
with the sound bound, and times it side by side with the original GloRo check (float32
forward + converged power-iteration estimate, which is *not* sound) so the cost of soundness
is a ratio measured in one run. Writes ``benchmarks/results/<preset>.json`` and prints a
markdown table row (``benchmarks/table.py`` prints them all).

    python benchmarks/gloro_mnist.py --preset gloro-mnist-0.3-2c2f --epochs 500
    python benchmarks/gloro_mnist.py --preset gloro-mnist-0.3-2c2f --run runs/gloro-mnist-0.3-2c2f
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from table import HEADER, RESULTS, row  # benchmarks/table.py, beside this script

from certnet.certify import evaluate
from certnet.checkpoint import load, write_json
from certnet.config import preset_path
from certnet.data import load_dataset
from certnet.methods.gloro import GloroNet, SoundConstants, bottom_logit, pairwise_lipschitz
from certnet.optim import Adam
from certnet.train import TrainConfig, Trainer


def estimate_check_seconds(model: GloroNet, x: torch.Tensor, eps: float) -> float:
    """Time of the original GloRo check: float32 logits vs y_bot from the power-iteration
    estimate (converged once beforehand, as gloro's ``refresh_iterates``)."""
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, len(x), 2000):
            logits = model(x[i:i + 2000])
            k = pairwise_lipschitz(model.head.weight, model.body_estimate(0))
            (logits.max(1).values > bottom_logit(logits, k, eps)).float().mean()
        return time.perf_counter() - start


def time_training_steps(config: TrainConfig, model: GloroNet, steps: int) -> float:
    """Median seconds of one training step (forward, loss, backward, Adam) on a copy of the
    model, timed in this process so it is measured side by side with certification."""
    model = copy.deepcopy(model).train()
    optimizer = Adam(model.parameters(), lr=config.lr)
    x = torch.rand(config.batch_size, *model.input_shape)
    y = torch.randint(0, model.num_classes, (config.batch_size,))
    eps = config.eps * config.eps_train_factor
    extra = {k: v(1.0) for k, v in config.loss_schedules.items()}

    def step() -> None:
        loss, _ = model.loss(x, y, eps, **extra)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    return timed(step, steps)


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--epochs", type=int, help="override the preset's epoch budget")
    parser.add_argument("--run", help="reuse this finished run instead of training")
    parser.add_argument("--out-dir", default="runs/bench", help="where to train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-steps", type=int, default=20)
    args = parser.parse_args()

    config = TrainConfig.from_yaml(preset_path(args.preset), epochs=args.epochs)
    if args.run:
        run = Path(args.run)
    else:
        run = Path(args.out_dir) / args.preset
        Trainer(config, run, resume=(run / "state").exists()).fit()
    model = load(run)
    saved = model.checkpoint_config
    epochs_done = saved.get("epoch")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_seconds = [m["train_seconds"] for m in metrics]

    step_seconds = time_training_steps(config, model, args.timing_steps)
    train = load_dataset("mnist", "train")
    steps_per_epoch = -(-len(train) // config.batch_size)
    test = load_dataset("mnist", "test")
    eps = float(saved["eps"])
    model.converge()
    report = evaluate(model, test, eps)
    # a cold certification: the float64 copy and its sound bounds, then the 10k points
    bounds = timed(lambda: SoundConstants.of(copy.deepcopy(model.layers).double()),
                   args.repeats)
    sound = bounds + timed(lambda: evaluate(model, test, eps), args.repeats)
    estimate = timed(lambda: estimate_check_seconds(model, test.images(), eps), args.repeats)
    lip = model.lipschitz_report()
    result = {
        "preset": args.preset, "run": str(run), "epochs": epochs_done,
        "preset_epochs": TrainConfig.from_yaml(preset_path(args.preset)).epochs,
        "eps": eps, "n": report.n, "clean_accuracy": report.clean_accuracy, "vra": report.vra,
        "train_seconds_per_epoch_median": statistics.median(train_seconds),
        "train_seconds_per_epoch_bench": step_seconds * steps_per_epoch,
        "certify_seconds_per_10k_sound": sound * 10000 / report.n,
        "sound_bounds_seconds": bounds,
        "certify_seconds_per_10k_estimate_unsound": estimate * 10000 / report.n,
        "sound_over_estimate_time": sound / estimate,
        "lipschitz_bound_over_estimate": lip["bound_over_estimate"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else
        f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.preset}-{epochs_done}ep.json", result)
    print(HEADER)
    print(row(result))

if __name__ == "__main__":
    main()
