"""The whole train -> certify job, as a user runs it, timed end to end and split by phase,
side by side for this checkout and an older commit in one run.

The job is the speed issue's: ``certnet train --method gloro --arch 2c2f --dataset mnist
--eps 0.3 --epochs 3`` then ``certnet certify`` on the test set, two processes each. For
each process: wall seconds (measured here), peak resident memory (the process's own rusage),
and, where the code writes them (``phase_seconds`` in results.json and the certify JSON),
the seconds of start-up (wall minus the time inside ``main``), data, model and optimizer
building, training steps, evaluation, checkpoints, plotting, the Lipschitz report,
certification and the rest ("other": the rest of ``main`` and the interpreter's exit).
Training steps come from metrics.jsonl's ``train_seconds`` for both, so "outside training" is
comparable. Variants alternate run by run (``--repeats``) and the medians are reported.

The older commit runs from a temporary ``git worktree`` with this checkout's virtual
environment (its ``src`` first on PYTHONPATH). Writes ``benchmarks/results/whole_job.json``
and prints a markdown table.

    python benchmarks/whole_job.py --baseline b896ed3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from checkouts import ROOT, run_certnet, worktree
from machine import certnet_commit, cpu_model

from certnet.checkpoint import write_json

RESULTS = Path(__file__).parent / "results" / "whole_job.json"
TRAIN = ["train", "--method", "gloro", "--arch", "2c2f", "--dataset", "mnist", "--eps", "0.3",
         "--quiet"]
#: phases reported per process, in this order
PHASES = ("start-up", "data", "build", "train", "evaluate", "checkpoint", "plot", "report",
          "certify", "other")


def split(wall: float, phases: dict[str, float] | None, train_steps: float) -> dict[str, float]:
    """Seconds per phase of one process: the code's own phases where it writes them."""
    if not phases:
        return {"train": train_steps}
    out = {k: v for k, v in phases.items() if k != "total"}
    out["start-up"] = wall - phases["total"]
    out["train"] = train_steps
    out["other"] = wall - sum(out.values())  # the rest of main, and the interpreter's exit
    return out


def job(src: Path, work: Path, epochs: int) -> dict:
    out = work / "run"
    train_wall, train_mib, _ = run_certnet(src, [*TRAIN, "--epochs", str(epochs),
                                                 "--out", str(out)])
    certify_json = work / "certify.json"
    certify_wall, certify_mib, _ = run_certnet(src, ["certify", str(out), "--json",
                                                     str(certify_json)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = sum(m["train_seconds"] for m in metrics)
    results = json.loads((out / "results.json").read_text())
    certified = json.loads(certify_json.read_text())
    return {
        "seconds": train_wall + certify_wall, "train_process_seconds": train_wall,
        "certify_process_seconds": certify_wall, "training_steps_seconds": train_steps,
        "outside_training_share": 1 - train_steps / (train_wall + certify_wall),
        "train_process_outside_share": 1 - train_steps / train_wall,
        "peak_mib": {"train": train_mib, "certify": certify_mib},
        "train_phases": split(train_wall, results.get("phase_seconds"), train_steps),
        "certify_phases": split(certify_wall, certified.get("phase_seconds"), 0.0),
        "clean_accuracy": certified["clean_accuracy"], "vra": certified["vra"],
    }


def median_job(runs: list[dict]) -> dict:
    """Field-wise medians (phases too) of repeated runs of one variant."""
    def med(values: list) -> object:
        if isinstance(values[0], dict):
            keys = set().union(*values)
            return {k: med([v[k] for v in values if k in v]) for k in sorted(keys)}
        return statistics.median(values)
    return {k: med([r[k] for r in runs]) for k in runs[0]}


def table(variants: dict[str, dict]) -> str:
    lines = ["| variant | job s | train process s | certify process s | training steps s | "
             "outside training | peak MiB train / certify | clean % | VRA % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in variants.items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['train_process_seconds']:.1f} | "
            f"{r['certify_process_seconds']:.1f} | {r['training_steps_seconds']:.1f} | "
            f"{100 * r['outside_training_share']:.0f}% | {r['peak_mib']['train']:.0f} / "
            f"{r['peak_mib']['certify']:.0f} | {100 * r['clean_accuracy']:.2f} | "
            f"{100 * r['vra']:.2f} |")
    lines += ["", "| variant | process | " + " | ".join(PHASES) + " |",
              "|---|---|" + "---|" * len(PHASES)]
    for name, r in variants.items():
        for process in ("train", "certify"):
            phases = r[f"{process}_phases"]
            cells = [f"{phases[p]:.2f}" if p in phases else "" for p in PHASES]
            lines.append(f"| {name} | {process} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an older commit to run side by side")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        sources = {"this checkout": ROOT / "src"}
        if args.baseline:
            root = stack.enter_context(worktree(args.baseline))
            sources[f"commit {args.baseline}"] = root / "src"
        runs: dict[str, list[dict]] = {name: [] for name in sources}
        for repeat in range(args.repeats):
            for name, src in sources.items():
                work = Path(tmp) / f"{len(runs[name])}-{name.replace(' ', '-')}"
                runs[name].append(job(src, work, args.epochs))
                print(f"repeat {repeat + 1}, {name}: {runs[name][-1]['seconds']:.1f} s",
                      flush=True)
    variants = {name: median_job(r) for name, r in runs.items()}
    result = {"variants": variants, "runs": runs, "epochs": args.epochs,
              "threads": os.environ.get("OMP_NUM_THREADS", "certnet default"),
              "machine": cpu_model(), "commit": certnet_commit(),
              "command": "python " + " ".join(sys.argv)}
    if args.baseline:
        base, this = variants[f"commit {args.baseline}"], variants["this checkout"]
        result["speedup"] = base["seconds"] / this["seconds"]
    write_json(RESULTS, result)
    print(table(variants))
    if "speedup" in result:
        print(f"\nwhole job {result['speedup']:.2f}x faster than commit {args.baseline}")


if __name__ == "__main__":
    main()
