"""Local-trained against global-trained GloRo over seeds: reads the per-seed results of
``benchmarks/local_lipschitz.py`` (one global run and its local twin per file), pairs them by
seed and reports, per seed and over seeds, the VRA difference of local training (each model
certified its own way: the global model with ``lipschitz``, the local one with
``local-lipschitz``), the same with the local certificate on both, and the clean-accuracy
difference: mean, sample standard deviation, standard error, a two-sided paired t-test and a
95% confidence interval of the mean (Student's t).

Writes ``benchmarks/results/local_lipschitz_seeds.json`` and prints a markdown table.

    python benchmarks/local_lipschitz_seeds.py benchmarks/results/local_lipschitz.json \\
        benchmarks/results/local_lipschitz_seed*.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from scipy import stats

from certnet.checkpoint import write_json

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results" / "local_lipschitz_seeds.json"
#: difference name -> (what the local run contributes, what the global run contributes)
DIFFERENCES = {
    "vra_own_certificate": (("local-lipschitz", "vra"), ("lipschitz", "vra")),
    "vra_local_certificate_on_both": (("local-lipschitz", "vra"), ("local-lipschitz", "vra")),
    "clean_accuracy": (("clean_accuracy",), ("clean_accuracy",)),
}


def _value(row: dict, path: tuple[str, ...]) -> float:
    for key in path:
        row = row[key]
    return 100 * float(row)


def _seed(run: str) -> int:
    return int(json.loads((ROOT / "models" / run / "config.json").read_text())["train"]["seed"])


def pair(path: Path) -> dict:
    """The seed and the local-minus-global differences (points) of one results file."""
    runs = {row["lipschitz_training"]: row for row in json.loads(path.read_text())["runs"]}
    local, glob = runs["local"], runs["global"]
    seed = _seed(local["run"])
    if _seed(glob["run"]) != seed:
        sys.exit(f"{path}: the global and local runs have different seeds")
    row = {"seed": seed, "global_run": glob["run"], "local_run": local["run"], "file": path.name,
           "vra_global_trained": _value(glob, ("lipschitz", "vra")),
           "vra_global_trained_local_certificate": _value(glob, ("local-lipschitz", "vra")),
           "vra_local_trained": _value(local, ("local-lipschitz", "vra"))}
    for name, (mine, theirs) in DIFFERENCES.items():
        row[name] = _value(local, mine) - _value(glob, theirs)
    return row


def summary(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean}
    sd = statistics.stdev(values)
    sem = sd / math.sqrt(n)
    t = mean / sem if sem > 0 else math.inf
    half = stats.t.ppf(0.975, n - 1) * sem
    return {"n": n, "mean": mean, "sd": sd, "sem": sem, "t": t,
            "p_two_sided": float(2 * stats.t.sf(abs(t), n - 1)),
            "ci95": [mean - half, mean + half]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    pairs = sorted((pair(p) for p in args.results), key=lambda r: r["seed"])
    seeds = [r["seed"] for r in pairs]
    if len(set(seeds)) != len(seeds):
        sys.exit(f"a seed appears twice: {seeds}")
    result = {"pairs": pairs,
              "summary": {name: summary([r[name] for r in pairs]) for name in DIFFERENCES},
              "command": "python benchmarks/local_lipschitz_seeds.py " +
                         " ".join(str(p) for p in args.results)}
    write_json(args.out, result)
    print("| seed | VRA %: global-trained, global cert / local cert; local-trained, local cert "
          "| VRA local - global, own certificates | with the local certificate on both "
          "| clean local - global |\n|---|---|---|---|---|")
    for r in pairs:
        print(f"| {r['seed']} | {r['vra_global_trained']:.2f} / "
              f"{r['vra_global_trained_local_certificate']:.2f}; {r['vra_local_trained']:.2f} | "
              f"{r['vra_own_certificate']:+.2f} | "
              f"{r['vra_local_certificate_on_both']:+.2f} | {r['clean_accuracy']:+.2f} |")
    cells = []
    for name in DIFFERENCES:
        s = result["summary"][name]
        cells.append(f"{s['mean']:+.2f} (sd {s['sd']:.2f}, 95% CI {s['ci95'][0]:+.2f} to "
                     f"{s['ci95'][1]:+.2f}, p {s['p_two_sided']:.3f})" if "sd" in s else
                     f"{s['mean']:+.2f}")
    print(f"| mean | | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
