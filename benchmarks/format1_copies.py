"""Copies of committed checkpoints as an older commit stored them (its ``config.json``, the
same weights linked), so a checkout that predates the current checkpoint format (format 2,
issue 24) can certify them beside this tree in side-by-side benchmarks:

    python benchmarks/format1_copies.py --commit 5a7ff9e --out /tmp/v1models \\
        models/ibp-mnist-0.3-dm-medium-cpu models/gloro-mnist-0.3-2c2f
    python benchmarks/rigor_speed.py --baseline 5a7ff9e --runs /tmp/v1models/* ...

This tree loads format-1 checkpoints too, so both sides certify the very same files.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="checkpoint directories in models/")
    parser.add_argument("--commit", required=True, help="the commit whose config.json to use")
    parser.add_argument("--out", type=Path, required=True, help="folder for the copies")
    args = parser.parse_args()
    for run in args.runs:
        target = args.out / run.name
        target.mkdir(parents=True, exist_ok=True)
        relative = run.resolve().relative_to(ROOT)
        config = subprocess.run(["git", "show", f"{args.commit}:{relative}/config.json"],
                                cwd=ROOT, check=True, capture_output=True).stdout
        (target / "config.json").write_bytes(config)
        weights = target / "model.safetensors"
        weights.unlink(missing_ok=True)
        weights.symlink_to(run.resolve() / "model.safetensors")
        print(target)


if __name__ == "__main__":
    main()
