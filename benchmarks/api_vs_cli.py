"""The README's Python quick start and its CLI, side by side on a busy machine (issue 26):
one epoch of the quick-start GloRo training (``train(TrainConfig(arch="2c2f",
dataset="mnist", eps=0.3, eps_train_factor=1.5, epochs=1), out)`` against ``certnet train
--method gloro --arch 2c2f --dataset mnist --eps 0.3 --eps-train-factor 1.5 --epochs 1``),
each in a fresh process with the environment a user has (no thread variables set), the two
alternating, while ``--hogs`` other processes keep cores busy. The epoch's seconds are read
from each run's ``metrics.jsonl`` (``train_seconds``). Writes
``benchmarks/results/api_vs_cli.json`` and prints a table.

    python benchmarks/api_vs_cli.py [--repeats 2] [--hogs 1]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import certnet_commit

from certnet.checkpoint import write_json

OUT = Path(__file__).parent / "results" / "api_vs_cli.json"
CONFIG = dict(arch="2c2f", dataset="mnist", eps=0.3, eps_train_factor=1.5, epochs=1)
API = ("import sys\nfrom certnet.train import TrainConfig, train\n"
       f"train(TrainConfig(**{CONFIG!r}), sys.argv[1])\n")
CLI = ["-m", "certnet.cli", "train", "--method", "gloro", "--arch", "2c2f", "--dataset",
       "mnist", "--eps", "0.3", "--eps-train-factor", "1.5", "--epochs", "1", "--quiet",
       "--out"]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def _hog() -> None:
    """Keep one core busy (what another user's job does)."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a = (a @ a).tanh()


def _epoch_seconds(argv: list[str], out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    subprocess.run([sys.executable, *argv, str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hogs", type=int, default=1, help="busy processes beside the runs")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    times: dict[str, list[float]] = {"python quick start": [], "cli": []}
    try:
        time.sleep(2)
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for name, argv in (("python quick start", ["-c", API]), ("cli", CLI)):
                    seconds = _epoch_seconds(argv, Path(tmp) / f"{name}-{r}".replace(" ", "_"))
                    times[name].append(seconds)
                    print(f"{name:<20} repeat {r}: {seconds:.1f} s/epoch", flush=True)
    finally:
        for hog in hogs:
            hog.terminate()
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["python quick start"] / medians["cli"]
    write_json(args.out, {"commit": certnet_commit(Path(__file__).parents[1] / "src" /
                                                   "certnet"),
                          "cpus": os.cpu_count(), "hogs": args.hogs, "config": CONFIG,
                          "seconds_per_epoch": times, "median": medians,
                          "ratio_python_over_cli": ratio})
    print(f"\n| run | s/epoch (median of {args.repeats}) |\n|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\npython / cli = {ratio:.2f} with {args.hogs} busy process(es); {args.out}")


if __name__ == "__main__":
    main()
