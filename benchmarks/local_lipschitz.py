"""Local vs global Lipschitz bounds (Huang et al. 2021) side by side, in one run: for a
globally trained GloRo run and its locally trained twin (same arch, schedule, epochs and
seed), the clean accuracy and VRA of each model certified by the global ``lipschitz`` and the
``local-lipschitz`` certificate, the certification time of each, and the training time per
epoch of each run (median of metrics.jsonl), with the local / global ratios; and the time to
certify the 10k MNIST test points at eps 1.58 with both certificates on a freshly initialised
clipped-ReLU GloRo net of ``--speed-arch`` (4C3F by default), on which the global bound
certifies nothing, so the local certificate runs on every point: its worst case.

Writes ``benchmarks/results/local_lipschitz.json`` and prints a markdown table.

    python benchmarks/local_lipschitz.py --global-run runs/gloro-mnist-1.58-2c2f-crelu-cpu \\
        --local-run runs/gloro-local-mnist-1.58-2c2f-cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from machine import certnet_commit, cpu_model

from certnet.certify import evaluate
from certnet.checkpoint import load, write_json
from certnet.data import Dataset, load_dataset
from certnet.methods.base import CertifiedModel

RESULTS = Path(__file__).parent / "results" / "local_lipschitz.json"
CERTIFIERS = ("lipschitz", "local-lipschitz")


def train_seconds(run: Path) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["train_seconds"] for line in lines)


def load_run(run: Path, limit: int | None = None) -> tuple[CertifiedModel, Dataset, float]:
    """A run's model, its test set (the first ``limit`` points, if given) and its eps."""
    model = load(run)
    data = load_dataset(model.checkpoint_config["dataset"], "test")
    if limit:
        data.x, data.y = data.x[:limit], data.y[:limit]
    return model, data, float(model.checkpoint_config["eps"])


def measure(run: Path, limit: int | None) -> dict:
    model, data, eps = load_run(run, limit)
    row = {"run": run.name, "lipschitz_training": model.method_config().get("lipschitz"),
           "epochs": model.checkpoint_config["epoch"], "eps": eps,
           "train_seconds_per_epoch": train_seconds(run)}
    for name in CERTIFIERS:
        report = evaluate(model, data, eps, certifier=name)
        row["clean_accuracy"] = report.clean_accuracy
        row[name] = {"vra": report.vra, "seconds": report.seconds, "n": report.n}
        print(report.summary(), flush=True)
    return row


def speed(arch: str) -> dict:
    from certnet.archs import build_arch
    from certnet.methods.gloro import GloroNet

    data = load_dataset("mnist", "test")
    model = GloroNet(build_arch(arch, (1, 28, 28), 10, activation="clipped-relu"), (1, 28, 28),
                     10).eval()
    row = {"arch": arch, "n": len(data)}
    for name in CERTIFIERS:
        report = evaluate(model, data, 1.58, certifier=name)
        row[name] = {"seconds": report.seconds, "vra": report.vra}
        print(report.summary(), flush=True)
    return row


def table(result: dict) -> str:
    lines = ["| run (training bounds) | epochs | clean % | VRA % global cert | VRA % local cert "
             "| certify s global / local | train s/epoch |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(
            f"| {r['run']} ({r['lipschitz_training']}) | {r['epochs']} | "
            f"{100 * r['clean_accuracy']:.2f} | {100 * r['lipschitz']['vra']:.2f} | "
            f"{100 * r['local-lipschitz']['vra']:.2f} | {r['lipschitz']['seconds']:.1f} / "
            f"{r['local-lipschitz']['seconds']:.1f} | {r['train_seconds_per_epoch']:.1f} |")
    ratios = result["ratios"]
    lines.append(f"\nlocal / global: training time per epoch {ratios['train_time']:.2f}x, "
                 f"certification time (local-trained model) {ratios['certify_time']:.2f}x, "
                 f"VRA of the local-trained model (local cert) minus the global-trained model "
                 f"(global cert) {100 * ratios['vra_gain']:+.2f} points")
    if result.get("speed"):
        sp = result["speed"]
        lines.append(f"certify {sp['n']} points, fresh {sp['arch']} (worst case): global "
                     f"{sp['lipschitz']['seconds']:.1f} s, local "
                     f"{sp['local-lipschitz']['seconds']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-run", type=Path, required=True)
    parser.add_argument("--local-run", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="certify the first N test points only")
    parser.add_argument("--speed-arch", default="4c3f",
                        help="arch of the worst-case timing ('' to skip it)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args()
    glob, local = measure(args.global_run, args.limit), measure(args.local_run, args.limit)
    result = {
        "runs": [glob, local],
        "ratios": {
            "train_time": local["train_seconds_per_epoch"] / glob["train_seconds_per_epoch"],
            "certify_time": local["local-lipschitz"]["seconds"] / local["lipschitz"]["seconds"],
            "vra_gain": local["local-lipschitz"]["vra"] - glob["lipschitz"]["vra"],
        },
        "speed": speed(args.speed_arch) if args.speed_arch else None,
        "machine": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "commit": certnet_commit(), "command": "python " + " ".join(sys.argv),
    }
    write_json(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
