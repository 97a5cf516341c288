"""Benchmark GloRo on MNIST: clean accuracy, VRA, train s/epoch, certify s per 10k, peak memory.

Trains a preset (or reuses a finished run with ``--run``), certifies the 10k MNIST test points
with the sound bound, and times it side by side with the original GloRo check (float32
forward + converged power-iteration estimate, which is *not* sound) so the cost of soundness
is a ratio measured in one run. Writes ``benchmarks/results/<preset>.json`` and prints a
markdown table row.

    python benchmarks/gloro_mnist.py --preset gloro-mnist-0.3-2c2f --epochs 500
    python benchmarks/gloro_mnist.py --preset gloro-mnist-0.3-2c2f --run runs/gloro-mnist-0.3-2c2f
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from certnet.certify import evaluate
from certnet.checkpoint import atomic_write, load
from certnet.cli import preset_path
from certnet.data import load_dataset
from certnet.methods.gloro import GloroNet, bottom_logit, pairwise_lipschitz
from certnet.train import TrainConfig, Trainer

RESULTS = Path(__file__).parent / "results"


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

    test = load_dataset("mnist", "test")
    eps = float(saved["eps"])
    model.converge()
    report = evaluate(model, test, eps)
    sound = timed(lambda: evaluate(model, test, eps), args.repeats)
    estimate = timed(lambda: estimate_check_seconds(model, test.x, eps), args.repeats)
    lip = model.lipschitz_report()
    result = {
        "preset": args.preset, "run": str(run), "epochs": epochs_done,
        "preset_epochs": TrainConfig.from_yaml(preset_path(args.preset)).epochs,
        "eps": eps, "n": report.n, "clean_accuracy": report.clean_accuracy, "vra": report.vra,
        "train_seconds_per_epoch_median": statistics.median(train_seconds),
        "certify_seconds_per_10k_sound": sound * 10000 / report.n,
        "certify_seconds_per_10k_estimate_unsound": estimate * 10000 / report.n,
        "sound_over_estimate_time": sound / estimate,
        "lipschitz_bound_over_estimate": lip["bound_over_estimate"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor()})",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write(RESULTS / f"{args.preset}.json", json.dumps(result, indent=2))
    print("| preset | epochs | eps | clean % | VRA % | train s/epoch | certify s/10k (sound) "
          "| sound/estimate time | bound/estimate | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {epochs_done} | {eps:g} | {100 * report.clean_accuracy:.2f} | "
          f"{100 * report.vra:.2f} | {result['train_seconds_per_epoch_median']:.2f} | "
          f"{result['certify_seconds_per_10k_sound']:.2f} | "
          f"{result['sound_over_estimate_time']:.2f}x | "
          f"{result['lipschitz_bound_over_estimate']:.4f} | {result['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
