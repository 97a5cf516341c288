"""Benchmark a finished training run of any method: clean and certified accuracy by each
certifier on the full test set, certify s per 10k points per certifier, the run's train
s/epoch, and a PGD check that no certified point flips, next to the published numbers.

Writes ``benchmarks/results/runs/<run name>.json`` and prints a markdown table of every result
in that folder (``--table`` prints the table only).

    python benchmarks/certified_runs.py --run models/ibp-mnist-0.3-dm-medium-cpu
    python benchmarks/certified_runs.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch
from machine import certnet_commit

from certnet.audit import attack_report
from certnet.certify import evaluate
from certnet.checkpoint import load, write_json
from certnet.data import load_dataset

RESULTS = Path(__file__).parent / "results" / "runs"
_CROWN_IBP = {  # CROWN-IBP, Zhang et al. 2020, Table 2 (DM-large)
    ("mnist", 0.1): "CROWN-IBP DM-large 99.03 / 97.75",
    ("mnist", 0.2): "CROWN-IBP DM-large 98.38 / 96.13",
    ("mnist", 0.3): "CROWN-IBP DM-large 98.38 / 93.32",
    ("mnist", 0.4): "CROWN-IBP DM-large 98.38 / 87.51",
}
#: (method, dataset, eps) -> published clean / certified accuracy (%) and its source.
PUBLISHED = {
    **{("ibp", *k): v for k, v in _CROWN_IBP.items()},
    **{("crown-ibp", *k): v for k, v in _CROWN_IBP.items()},
    # l_inf-dist net v2 (Zhang et al. 2022, Table 1; width 5120) and v1 (Zhang et al. 2021)
    ("linf-dist", "mnist", 0.3): "l_inf-dist net v2 (width 5120) 98.56 / 93.20",
    ("linf-dist", "mnist", 0.1): "l_inf-dist net v2 (width 5120) 98.93 / 97.95",
    ("linf-dist", "fashion-mnist", 0.1): "l_inf-dist net v1 - / 79.23",
    ("linf-dist", "cifar10", round(8 / 255, 6)): "l_inf-dist net v2 54.30 / 40.06",
    ("linf-dist", "cifar10", round(2 / 255, 6)): "l_inf-dist net v2 60.61 / 54.12",
}
HEADER = ("| run | method / arch | epochs | eps | clean % | certified % by certifier "
          "| certify s/10k | train s/epoch (median) | PGD: certified flipped / points "
          "| published clean / verified |\n|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    verified = ", ".join(f"{c['certifier']} {100 * c['vra']:.2f}" for c in r["certifiers"])
    seconds = ", ".join(f"{c['certifier']} {c['seconds_per_10k']:.0f}" for c in r["certifiers"])
    pgd = r["pgd"]
    return (f"| {r['run']} | {r['method']} / {r['arch']} | {r['epochs']} | {r['eps']:g} | "
            f"{100 * r['clean_accuracy']:.2f} | {verified} | {seconds} | "
            f"{r['train_seconds_per_epoch_median']:.1f} | {pgd['flipped_certified']} / "
            f"{pgd['n']} | {r['published']} |")


def table() -> None:
    print(HEADER)
    for path in sorted(RESULTS.glob("*.json")):
        print(row(json.loads(path.read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="checkpoint directory of a finished run")
    parser.add_argument("--certifiers",
                        help="comma-separated certifiers to evaluate on the whole test set "
                             "(default: the model's own)")
    parser.add_argument("--attack-limit", type=int, default=1000,
                        help="PGD-attack the first N test points (certificates of the first "
                             "certifier)")
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args()
    if args.table or not args.run:
        table()
        return
    model = load(args.run)
    names = (args.certifiers or model.default_certifier).split(",")
    config = model.checkpoint_config
    train = config.get("train") or {}
    data = load_dataset(config["dataset"], "test")
    eps = float(config["eps"])
    certifiers = []
    clean = None
    for name in names:
        report = evaluate(model, data, eps, certifier=name)
        clean = report.clean_accuracy
        certifiers.append({"certifier": name, "vra": report.vra,
                           "seconds_per_10k": report.seconds * 10000 / report.n,
                           "certified_by": report.certified_by})
        print(report.summary(), flush=True)
    attack = attack_report(model, data.images(slice(args.attack_limit)),
                           data.y[:args.attack_limit], eps, steps=100, restarts=5,
                           certifier=names[0])
    lines = (Path(args.run) / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["train_seconds"] for line in lines]
    result = {
        "run": Path(args.run).name, "method": config["method"], "arch": train.get("arch"),
        "dataset": config["dataset"], "eps": eps, "epochs": config["epoch"],
        "clean_accuracy": clean, "certifiers": certifiers,
        "train_seconds_per_epoch_median": statistics.median(seconds),
        "pgd": {k: attack[k] for k in ("n", "steps", "restarts", "robust_accuracy", "vra",
                                       "flipped_certified", "violations")},
        "published": PUBLISHED.get((config["method"], config["dataset"], round(eps, 6)), "-"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": certnet_commit(),
        "command": "python " + " ".join(sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{result['run']}.json", result)
    table()


if __name__ == "__main__":
    main()
